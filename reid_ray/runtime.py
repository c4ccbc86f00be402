"""The Ray runtime every stage shares: start or join a cluster, plan actor pools, devices.

One rule for resources, used by embedding, re-ranking, training and the stages to come:

* **Ask, do not snapshot.** An explicit GPU request (``device="cuda"`` or
  ``gpus_per_actor > 0``) is honoured even when the cluster has no GPU node yet: Ray's
  autoscaler adds GPU nodes for pending GPU actors, so the job waits for them instead of
  silently running on CPU. ``device="auto"`` uses GPUs when the cluster has them now.
* **Leave CPUs for Ray Data.** Actors together take at most the cluster's CPUs less a
  reserve for the read/decode tasks that feed them: half a CPU on small nodes
  (< 8 CPUs), a quarter of the CPUs otherwise. Two actors holding every CPU of a 2-core
  machine hang the read tasks (``ENVIRONMENT.md``).
* **Threads follow the CPU share.** Ray sets ``OMP_NUM_THREADS=1`` in workers; an actor
  sets torch/OpenCV threads to ``ceil(cpus_per_actor)``.

``plan_pool`` is pure (it takes a :class:`ClusterView`), so the policy is unit-tested
without Ray.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from reid_ray.errors import ConfigError, ModelError, OutputError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


# -- the cluster ---------------------------------------------------------------------------


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    log_file: str | None = None,
    object_store_memory: int | None = None,
) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS``, or start a local one.

    A local cluster stays on 127.0.0.1 so it works on machines without a routable
    address. Ray's own INFO logging goes to ``log_file`` (see
    :func:`reid_ray.console.route_ray_logs`) when given and no log file is in use yet: a
    stage called by a command keeps the command's log, the one its user was told about.
    """
    import ray

    from reid_ray.console import ray_log_in_use, route_ray_logs

    route_ray_logs(None if ray_log_in_use() else log_file)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(
        configure_logging=False, log_to_driver=False, logging_level=logging.WARNING
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(
            # a new local cluster: never one that `ray start` left running on this machine
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=object_store_memory,
            **kwargs,
        )
    route_ray_logs(None)  # ray.init dropped the handlers of the "ray" logger
    configure_data_context()
    logger.debug("Ray cluster resources: %s", ray.cluster_resources())


def configure_data_context() -> None:
    """Ray Data settings reid-ray relies on: unordered output, our own progress bars."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = os.environ.get("REID_RAY_RAY_PROGRESS", "0") == "1"
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


@dataclass(frozen=True)
class ClusterView:
    """What the cluster holds now: CPUs, GPUs, alive nodes, and the CPUs of its largest
    node (``node_cpus``; 0 = unknown, taken as ``cpus``): one actor never gets more."""

    cpus: float
    gpus: float
    nodes: int = 1
    node_cpus: float = 0.0


def cluster_view() -> ClusterView:
    import ray

    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive), default=0.0)
    return ClusterView(
        float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0)), max(1, len(alive)), node_cpus
    )


def cluster_cpus() -> float:
    return cluster_view().cpus


def cluster_gpus() -> float:
    return cluster_view().gpus


def require_shared_output(out: str, what: str = "output") -> None:
    """Refuse a local output folder on a cluster of several nodes: workers on other nodes
    would write where the driver (and each other) cannot read."""
    from reid_ray import io as rio

    if rio.is_remote(out) or os.environ.get("REID_RAY_SHARED_FS") == "1":
        return
    nodes = cluster_view().nodes
    if nodes > 1:
        raise OutputError(
            f"{what} {out!r} is a local folder but the Ray cluster has {nodes} nodes: workers "
            "on other nodes cannot see it. Use shared storage (s3://...), or set "
            "REID_RAY_SHARED_FS=1 if the path is on a file system every node mounts."
        )


# -- pools ---------------------------------------------------------------------------------


def data_reserve(cpus: float) -> float:
    """CPUs left to Ray Data's read/decode tasks beside an actor pool."""
    return 0.5 if cpus < 8 else cpus / 4


@dataclass(frozen=True)
class PoolPlan:
    """Concrete numbers for one actor pool (recorded in the run record)."""

    device: str
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    free_cpus: float  # what the pool leaves for Ray Data tasks
    waits_for_gpus: bool = False  # GPUs requested that the cluster does not have yet

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def map_batches_kwargs(self) -> dict[str, Any]:
        """The resource arguments of ``Dataset.map_batches`` for this pool."""
        import ray.data

        return dict(
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=self.cpus_per_actor,
            num_gpus=self.gpus_per_actor,
        )


def plan_pool(
    cluster: ClusterView,
    *,
    device: str = "auto",
    actors: int = 0,
    cpus_per_actor: float = 0.0,
    gpus_per_actor: float = 0.0,
    cpus_per_cpu_actor: float = 0.0,
    max_cpu_actors: int = 0,
) -> PoolPlan:
    """Size an actor pool on ``cluster`` (0 means automatic for every number).

    GPU pools: ``gpus_per_actor`` (default 1) each, one actor per GPU the cluster has
    (at least one when GPUs were asked for explicitly), 1 CPU each.
    CPU pools: the CPU budget (``cluster.cpus - data_reserve``) split over ``actors``;
    when ``actors`` is 0, ``cpus_per_cpu_actor`` CPUs per actor decides how many (default:
    one actor holding the whole budget), capped at ``max_cpu_actors`` when given.
    """
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    for name, value in (
        ("actors", actors),
        ("cpus_per_actor", cpus_per_actor),
        ("gpus_per_actor", gpus_per_actor),
    ):
        if value is None or value < 0 or not math.isfinite(float(value)):
            raise ConfigError(f"{name} must be >= 0 (0: automatic), got {value!r}")
    explicit_gpu = device == "cuda" or gpus_per_actor > 0
    if device == "cpu" and gpus_per_actor > 0:
        raise ConfigError("device 'cpu' contradicts gpus_per_actor > 0")
    use_gpu = explicit_gpu or (device == "auto" and cluster.gpus >= 1)
    cpus = max(float(cluster.cpus), 0.25)
    if use_gpu:
        gpa = float(gpus_per_actor or 1.0)
        n = int(actors or max(1, int(cluster.gpus // gpa) if cluster.gpus >= gpa else 1))
        cpa = float(cpus_per_actor or 1.0)
        waits = cluster.gpus < n * gpa
        if waits:
            logger.warning(
                "%d actor(s) x %g GPU requested, the cluster has %g GPU(s) now: the pool "
                "waits for the autoscaler to add GPU nodes",
                n,
                gpa,
                cluster.gpus,
            )
        return PoolPlan(
            device="cuda",
            actors=n,
            cpus_per_actor=cpa,
            gpus_per_actor=gpa,
            threads=max(1, math.ceil(cpa)),
            free_cpus=max(0.0, cpus - n * cpa),
            waits_for_gpus=waits,
        )
    budget = max(0.25, cpus - data_reserve(cpus))
    if actors:
        n = int(actors)
    elif cpus_per_actor:
        n = max(1, int(budget // float(cpus_per_actor)))
    elif cpus_per_cpu_actor:
        n = max(1, int(budget // float(cpus_per_cpu_actor)) or 1)
    else:
        n = 1
    if max_cpu_actors:
        n = min(n, int(max_cpu_actors)) if not actors else n
    cpa = float(cpus_per_actor or max(0.25, math.floor(budget / n * 4) / 4))
    node = float(cluster.node_cpus or cpus)
    if not cpus_per_actor and node < cpus:  # several nodes: an actor must fit on one
        cpa = min(cpa, max(0.25, math.floor((node - data_reserve(node)) * 4) / 4))
    elif cpus_per_actor and cpa > node + 1e-9:
        logger.warning(
            "%g CPUs per actor is more than the largest node has now (%g): the pool waits "
            "for the autoscaler to add a node that large",
            cpa,
            node,
        )
    if n * cpa > cpus + 1e-9:
        raise ConfigError(
            f"{n} actors x {cpa:g} CPUs exceed the cluster's {cpus:g} CPUs; "
            "lower the actor count or the CPUs per actor"
        )
    return PoolPlan(
        device="cpu",
        actors=n,
        cpus_per_actor=cpa,
        gpus_per_actor=0.0,
        threads=max(1, math.ceil(cpa)),
        free_cpus=max(0.0, cpus - n * cpa),
    )


def plan_data_tasks(
    cluster: ClusterView, *, held_cpus: float = 0.0, cpus_per_task: float = 1.0
) -> tuple[int, float]:
    """``(tasks, cpus each)`` for Ray Data CPU work (decoding, reading) on ``cluster``.

    The work gets the CPUs that actors or Ray Train workers do not hold (``held_cpus``),
    never less than :func:`data_reserve`, in tasks of ``cpus_per_task`` (the whole free
    share when less is free): a 64-CPU cluster decodes on ~60 tasks, a 2-CPU machine
    beside two training workers on one half-CPU task.
    """
    cpus = max(float(cluster.cpus), 0.25)
    free = max(cpus - max(0.0, float(held_cpus)), data_reserve(cpus), 0.25)
    per = min(max(0.25, float(cpus_per_task)), free)
    return max(1, int(free / per + 1e-9)), per


# -- inside a worker ------------------------------------------------------------------------


def resolve_device(requested: str = "auto") -> str:
    """The torch device for this process: ``cuda`` when asked for or visible (``auto``)."""
    import torch

    if requested not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("device 'cuda' requested but no CUDA device is visible here")
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(n: int) -> None:
    """torch (and OpenCV, when installed) threads for this worker: its CPU share."""
    import torch

    n = max(1, int(n))
    torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover - OpenCV is a dependency
        pass


__all__ = [
    "ClusterView",
    "PoolPlan",
    "cluster_cpus",
    "cluster_gpus",
    "cluster_view",
    "configure_data_context",
    "data_reserve",
    "init_ray",
    "plan_data_tasks",
    "plan_pool",
    "require_shared_output",
    "resolve_device",
    "set_threads",
]


def get_result(ref: Any) -> Any:
    """``ray.get``, except that a reid-ray error raised inside the task comes back as
    itself (one clear message), not wrapped in Ray's remote traceback."""
    import ray

    from reid_ray.errors import ReidRayError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ReidRayError):
            raise exc.cause from None
        raise
