"""The Ray runtime every stage shares: start or join a cluster, plan actor pools, devices.

One rule for resources, used by embedding, re-ranking, training and the stages to come:

* **Ask, do not snapshot.** A job says "use GPUs" with ``device: cuda`` (or
  ``gpus_per_actor > 0``): that request is honoured even when the cluster has no GPU node
  yet. Ray's autoscaler adds GPU nodes for pending GPU actors, so the job waits for them;
  it never falls back silently to CPU (an actor that holds a GPU but sees no CUDA fails).
  ``device: auto`` uses GPUs when the cluster has them now or its autoscaler config says it
  can add them; otherwise it plans CPU, with a warning when the cluster autoscales.
* **Sized by the work.** Automatic pool sizes are capped by the work (``max_actors``): a
  night of 5k images does not start one actor per GPU of a large cluster.
* **CPU work stays off GPUs.** A stage that is CPU code (decoding, SIFT, classical
  matching) plans a CPU pool whatever the device, and :func:`hide_unassigned_gpus` hides
  the node's GPUs from an actor Ray gave none (Ray leaves ``CUDA_VISIBLE_DEVICES`` unset
  for zero-GPU workers on a GPU node).
* **Leave CPUs for Ray Data.** Actors together take at most the cluster's CPUs less a
  reserve for the read/decode tasks that feed them: half a CPU on small nodes
  (< 8 CPUs), a quarter of the CPUs otherwise. Two actors holding every CPU of a 2-core
  machine hang the read tasks (``docs/design.md``).
* **Threads follow the CPU share.** Ray sets ``OMP_NUM_THREADS=1`` in workers; an actor
  sets torch/OpenCV threads to ``ceil(cpus_per_actor)``.

``plan_pool`` is pure (it takes a :class:`ClusterView`), so the policy is unit-tested
without Ray. The guards of a multi-node run live here too: :func:`require_shared_output`
(no local outputs on a cluster of several nodes or one that autoscales),
:func:`require_readable_inputs` (the first images read from a worker before a pass) and
:func:`check_error_rate` (a pass whose rows mostly failed is a failed job).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from reid_ray.errors import ConfigError, ManifestError, ModelError, OutputError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
#: ``cpu``: actors that hold a GPU compute on CPU (Ray's fake autoscaling cluster, whose
#: GPU nodes have no CUDA); a warning says so. Never set in production.
COMPUTE_DEVICE_ENV = "REID_RAY_COMPUTE_DEVICE"
#: ``1``: local paths are on a file system every node mounts (NFS, Lustre...)
SHARED_FS_ENV = "REID_RAY_SHARED_FS"
#: a pass whose share of rows in ``errors`` exceeds this fails (``max_error_rate``)
DEFAULT_MAX_ERROR_RATE = 0.5


class ErrorRateError(ManifestError):
    """Too many rows of a pass failed: the job fails instead of "succeeding" with its
    output in ``errors``."""


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
    # a submitted job (an existing cluster) keeps worker logs in `ray job logs`
    kwargs: dict[str, Any] = dict(
        configure_logging=False, log_to_driver=bool(address), logging_level=logging.WARNING
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
    node (``node_cpus``; 0 = unknown, taken as ``cpus``): one actor never gets more.
    ``autoscaling``: an autoscaler can add nodes; ``max_gpus``: the GPUs its config lets
    the cluster grow to, where Ray knows it (0: unknown or none)."""

    cpus: float
    gpus: float
    nodes: int = 1
    node_cpus: float = 0.0
    autoscaling: bool = False
    max_gpus: float = 0.0


def autoscaler_limits() -> dict[str, float] | None:
    """The autoscaler's view from Ray's state: ``{}`` or the most of each resource its
    config allows when the cluster autoscales, None when it does not.

    Autoscaler v2 (and KubeRay) publish the node groups in the GCS; the v1 autoscaler's
    monitor (``ray up``, ``ray start --autoscaling-config``) publishes an
    ``autoscaler_report`` whose node types come from its config, where a fixed cluster's
    read-only autoscaler reports one anonymous type per node.
    """
    import json

    from ray._private import state
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    try:
        limits = state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - older GCS without the config: not autoscaling here
        limits = None
    if limits:
        return {k: float(v) for k, v in limits.items()}
    if not _internal_kv_initialized():
        return None
    status = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
    try:
        report = (json.loads(status).get("autoscaler_report") if status else None) or {}
    except ValueError:
        report = {}
    return {} if reports_autoscaling(report) else None


def reports_autoscaling(report: dict[str, Any]) -> bool:
    """Whether a v1 ``autoscaler_report`` comes from an autoscaler with node types of its
    own: a fixed cluster runs a read-only autoscaler that names each node ``node_<id>``
    (``ray.autoscaler._private.util.format_readonly_node_type``)."""
    types = {*(report.get("node_type_mapping") or {}).values(), *(report.get("active_nodes") or {})}
    types |= set(report.get("pending_launches") or {})
    return any(not str(t).startswith("node_") for t in types)


def cluster_view() -> ClusterView:
    import ray

    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive), default=0.0)
    limits = autoscaler_limits()
    return ClusterView(
        float(res.get("CPU", 1.0)),
        float(res.get("GPU", 0.0)),
        max(1, len(alive)),
        node_cpus,
        autoscaling=limits is not None,
        max_gpus=min(float((limits or {}).get("GPU", 0.0)), 1e6),
    )


def cluster_cpus() -> float:
    return cluster_view().cpus


def cluster_gpus() -> float:
    return cluster_view().gpus


def shared_fs() -> bool:
    """Whether the user declared local paths to be on a file system every node mounts."""
    return os.environ.get(SHARED_FS_ENV) == "1"


def _local_paths_problem(view: ClusterView) -> str | None:
    if view.nodes > 1:
        return f"the Ray cluster has {view.nodes} nodes"
    if view.autoscaling:
        return "the Ray cluster autoscales (nodes it adds later have their own disks)"
    return None


def require_shared_output(out: str, what: str = "output") -> None:
    """Refuse a local output folder on a cluster of several nodes, or one whose
    autoscaler can add nodes (counted now, a one-node cluster that grows later would pass):
    workers on other nodes would write where the driver (and each other) cannot read."""
    from reid_ray import io as rio

    if rio.is_remote(out) or shared_fs():
        return
    problem = _local_paths_problem(cluster_view())
    if problem:
        raise OutputError(
            f"{what} {out!r} is a local folder but {problem}: workers on other nodes cannot "
            f"see it. Use shared storage (s3://...), or set {SHARED_FS_ENV}=1 if the path is "
            "on a file system every node mounts."
        )


def _first_bytes(path: str) -> str | None:
    """Read the start of ``path`` here (a Ray worker); the reason when it cannot be read."""
    from reid_ray import io as rio

    try:
        fs, p = rio.filesystem(path)
        with fs.open(p, "rb") as f:
            if not f.read(16):
                return "the file is empty"
    except Exception as exc:  # noqa: BLE001 - the reason goes back to the driver
        return f"{type(exc).__name__}: {exc}"
    return None


def require_readable_inputs(paths: Sequence[str], what: str = "images", sample: int = 4) -> None:
    """Before a pass: the first ``sample`` of ``paths`` must be readable from Ray workers
    (spread over the nodes), not only from the driver. Local paths on a cluster of several
    nodes (or one that autoscales) are refused unless ``REID_RAY_SHARED_FS=1``; when none
    of the sample can be read (no credentials on the workers, a wrong bucket) the job
    stops here instead of writing one error row per image after a full pass. A few bad
    files among good ones are left to the pass (they become error rows)."""
    import ray

    from reid_ray import io as rio

    sample_paths = [str(p) for p in paths if p][: max(1, int(sample))]
    if not sample_paths:
        return
    view = cluster_view()
    local = [p for p in sample_paths if not rio.is_remote(p)]
    problem = _local_paths_problem(view)
    if local and problem and not shared_fs():
        raise ManifestError(
            f"the {what} are local paths (e.g. {local[0]!r}) but {problem}: workers on other "
            f"nodes cannot read them. Put them on shared storage (s3://...), or set "
            f"{SHARED_FS_ENV}=1 if every node mounts that path."
        )
    probe = ray.remote(num_cpus=0, max_retries=0)(_first_bytes)
    refs = [probe.options(scheduling_strategy="SPREAD").remote(p) for p in sample_paths]
    reasons = ray.get(refs)
    failed = [(p, r) for p, r in zip(sample_paths, reasons, strict=True) if r]
    if len(failed) == len(sample_paths):
        path, reason = failed[0]
        raise ManifestError(
            f"none of the first {len(sample_paths)} {what} can be read from a Ray worker, "
            f"e.g. {path!r}: {reason}. Check the paths and that the workers have access "
            "(credentials, mounts)."
        )
    for path, reason in failed:
        logger.warning("%s %s not readable from a Ray worker: %s", what, path, reason)


def check_error_rate(
    n_errors: int, n_rows: int, what: str, max_error_rate: float | None = None, where: str = ""
) -> None:
    """Fail the job when more than ``max_error_rate`` (default 0.5) of its ``n_rows`` rows
    ended in ``errors``: a run over unreadable inputs is a failed run, not a success
    holding every row as an error. 1.0 turns the check off."""
    limit = DEFAULT_MAX_ERROR_RATE if max_error_rate is None else float(max_error_rate)
    if n_rows <= 0 or n_errors / n_rows <= limit:
        return
    raise ErrorRateError(
        f"{n_errors} of {n_rows} {what} ({100 * n_errors / n_rows:.0f}%) failed, above "
        f"max_error_rate {limit:g}" + (f"; the reasons are in {where}" if where else "") + ". "
        "Fix the inputs and rerun (finished rows are kept), or raise max_error_rate."
    )


def copy_ray_log(out: str | None) -> str | None:
    """Copy the local file holding Ray's logs (:func:`reid_ray.console.route_ray_logs`)
    to ``<out>/logs/ray.log`` when ``out`` is an object store (a local ``out`` holds it
    already); returns the copy's path. Best effort: a failed copy only warns."""
    from reid_ray import io as rio
    from reid_ray.console import ray_log_in_use

    log = ray_log_in_use()
    if not out or not rio.is_remote(out) or not log or not os.path.exists(log):
        return None
    target = rio.join(out, "logs", "ray.log")
    try:
        with open(log, "rb") as f:
            rio.write_bytes_atomic(target, f.read())
    except Exception as exc:  # noqa: BLE001 - the run itself succeeded
        logger.warning("could not copy Ray's log %s to %s: %s", log, target, exc)
        return None
    return target


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
    max_actors: int = 0,
) -> PoolPlan:
    """Size an actor pool on ``cluster`` (0 means automatic for every number).

    GPU pools: ``gpus_per_actor`` (default 1) each, 1 CPU each; ``actors`` exactly, else
    one per GPU the cluster has now (or may grow to, when its autoscaler config says),
    at least one, at most ``max_actors`` (the work's cap).
    CPU pools: the CPU budget (``cluster.cpus - data_reserve``) split over ``actors``;
    when ``actors`` is 0, ``cpus_per_cpu_actor`` CPUs per actor decides how many (default:
    one actor holding the whole budget), capped at ``max_cpu_actors``/``max_actors``.
    """
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    for name, value in (
        ("actors", actors),
        ("cpus_per_actor", cpus_per_actor),
        ("gpus_per_actor", gpus_per_actor),
        ("max_actors", max_actors),
    ):
        if value is None or value < 0 or not math.isfinite(float(value)):
            raise ConfigError(f"{name} must be >= 0 (0: automatic), got {value!r}")
    explicit_gpu = device == "cuda" or gpus_per_actor > 0
    if device == "cpu" and gpus_per_actor > 0:
        raise ConfigError("device 'cpu' contradicts gpus_per_actor > 0")
    can_get_gpus = cluster.gpus >= 1 or cluster.max_gpus >= 1
    use_gpu = explicit_gpu or (device == "auto" and can_get_gpus)
    if device == "auto" and not use_gpu and cluster.autoscaling:
        logger.warning(
            "device 'auto' planned a CPU pool: the cluster has no GPU now and Ray does not "
            "say its autoscaler can add any. Set device: cuda to ask for GPU nodes."
        )
    cpus = max(float(cluster.cpus), 0.25)
    if use_gpu:
        gpa = float(gpus_per_actor or 1.0)
        gpus = cluster.gpus if cluster.gpus >= gpa else cluster.max_gpus
        n = int(actors or max(1, int(gpus // gpa)))
        if max_actors and not actors:
            n = min(n, int(max_actors))
        cpa = float(cpus_per_actor or 1.0)
        waits = cluster.gpus < n * gpa
        if waits:
            logger.warning(
                "%d actor(s) x %g GPU requested, the cluster has %g GPU(s) now: the pool "
                "waits for %s",
                n,
                gpa,
                cluster.gpus,
                "the autoscaler to add GPU nodes"
                if cluster.autoscaling
                else "GPU nodes to join (Ray reports no autoscaler on this cluster)",
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
    max_cpu_actors = min(x for x in (max_cpu_actors, max_actors, 1 << 30) if x)
    budget = max(0.25, cpus - data_reserve(cpus))
    if actors:
        n = int(actors)
    elif cpus_per_actor:
        n = max(1, int(budget // float(cpus_per_actor)))
    elif cpus_per_cpu_actor:
        n = max(1, int(budget // float(cpus_per_cpu_actor)) or 1)
    else:
        n = 1
    if not actors:
        n = min(n, int(max_cpu_actors))
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
    """The torch device for this process: ``cuda`` when asked for or visible (``auto``).

    ``cuda`` without a visible GPU raises (never a silent CPU run), unless
    ``REID_RAY_COMPUTE_DEVICE=cpu`` says to compute on CPU while holding Ray's GPU
    resource (the fake GPU nodes of Ray's autoscaling test cluster); that is logged.
    """
    import torch

    if requested not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    if os.environ.get(COMPUTE_DEVICE_ENV) == "cpu":
        logger.warning(
            "%s=cpu: computing on CPU although device %r was requested",
            COMPUTE_DEVICE_ENV,
            requested,
        )
        return "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("device 'cuda' requested but no CUDA device is visible here")
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def hide_unassigned_gpus() -> bool:
    """In a Ray worker that holds no GPU, hide the node's GPUs from CUDA (torch, faiss):
    Ray leaves ``CUDA_VISIBLE_DEVICES`` unset for zero-GPU workers, which then see and may
    use every GPU of a GPU node. Call it first in an actor's ``__init__``, before CUDA
    starts. Returns whether it hid them; the driver and GPU actors are left alone."""
    import ray

    worker = ray._private.worker.global_worker
    if not ray.is_initialized() or worker.mode != ray._private.worker.WORKER_MODE:
        return False
    if ray.get_gpu_ids():
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return True


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
    "ErrorRateError",
    "PoolPlan",
    "autoscaler_limits",
    "check_error_rate",
    "cluster_cpus",
    "cluster_gpus",
    "cluster_view",
    "configure_data_context",
    "copy_ray_log",
    "data_reserve",
    "hide_unassigned_gpus",
    "init_ray",
    "plan_data_tasks",
    "plan_pool",
    "reports_autoscaling",
    "require_readable_inputs",
    "require_shared_output",
    "resolve_device",
    "set_threads",
    "shared_fs",
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
