"""Thin helpers shared by every Ray stage: starting or joining a cluster, sizing pools."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS``, or start a local one.

    A local cluster stays on 127.0.0.1 so it works on machines without a routable address.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = dict(configure_logging=False, log_to_driver=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    configure_data_context()
    logger.info("Ray cluster resources: %s", ray.cluster_resources())


def configure_data_context() -> None:
    """Ray Data settings reid-ray relies on: ordered output is not needed, quiet logs."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") != "1"


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
