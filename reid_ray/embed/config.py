"""Embedding settings and the resource plan derived from them and the cluster.

``EmbedConfig`` is what the user may set (0 / "auto" means "decide from the cluster"),
read by the one config loader (:func:`reid_ray.config.load_config`); ``plan_resources``
is embedding's policy over :func:`reid_ray.runtime.plan_pool`: the pool sizing rules
(explicit GPU requests wait for the autoscaler, CPUs left for Ray Data) live there, the
embedding-specific numbers (batch sizes, precision, decoder shares) here. Both are pure,
so the defaults are unit-tested without Ray.

Defaults, measured on a 2-core machine (``benchmarks/results/embed_throughput.json``):
one inference actor holding 1.5 CPUs with 2 torch threads, decoders on 0.25 CPU beside
it. On a GPU cluster: one actor per GPU with half precision, decoders on 1 CPU each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from reid_ray import config as rconfig
from reid_ray.config import check, check_choice
from reid_ray.errors import ConfigError
from reid_ray.runtime import DEFAULT_MAX_ERROR_RATE, DEVICES, ClusterView, plan_pool

PRECISIONS = ("auto", "fp32", "fp16")
DECODE_MODES = ("actors", "tasks")
#: one CPU inference actor per this many CPUs (threads scale well up to about 8)
CPUS_PER_CPU_ACTOR = 8
#: automatic pools get at most one actor per this many images: a GPU embeds thousands of
#: images a second, a CPU actor tens, so a small night never starts a large pool
ROWS_PER_GPU_ACTOR = 20_000
ROWS_PER_CPU_ACTOR = 2_000


@dataclass(frozen=True)
class EmbedConfig:
    """User-facing embedding settings; 0 or "auto" means chosen from the cluster.

    ``image_size`` overrides the model's input side (None: the model's own).
    ``flip`` adds horizontal-flip test-time augmentation (features of the image and of its
    mirror summed, then L2-normalised; it changes the stored fingerprint).
    ``batch_size`` images per inference call; ``actors`` size of the inference pool
    (exactly; 0: one per GPU, or per 8 CPUs, capped by the work: one per 20k images on
    GPU, 2k on CPU); ``cpus_per_actor``/``gpus_per_actor``/``threads`` CPU and GPU
    share and torch threads of each actor (``gpus_per_actor`` 0: 1 on GPU);
    ``decode_cpus`` CPU share of each decoder; ``decode_batch_size`` images per decode
    call; ``decode_tasks`` most decoders at a time (0: the CPUs the inference actors
    leave free, divided by ``decode_cpus``); ``decode_mode`` actors (long-lived decoder
    actors, the default) or tasks (one Ray task per block); ``read_threads`` concurrent
    reads per decode batch (object stores answer slowly, one read at a time wastes the
    decoder); ``rows_per_part`` rows per Parquet part, written by a worker (the unit of
    resume); ``device`` auto | cpu | cuda; ``precision`` auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16.
    """

    image_size: int | None = None
    flip: bool = False
    batch_size: int = 0
    actors: int = 0
    cpus_per_actor: float = 0.0
    gpus_per_actor: float = 0.0
    threads: int = 0
    decode_cpus: float = 0.0
    decode_batch_size: int = 0
    decode_tasks: int = 0
    decode_mode: str = "actors"
    read_threads: int = 8
    rows_per_part: int = 2048
    device: str = "auto"
    precision: str = "auto"
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE

    def __post_init__(self) -> None:
        # direct construction (EmbedConfig(...)) is checked like a loaded config
        check_choice("device", self.device, DEVICES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("decode_mode", self.decode_mode, DECODE_MODES)
        check(
            self.image_size is None or 16 <= int(self.image_size) <= 4096,
            f"image_size must be between 16 and 4096, got {self.image_size}",
        )
        for name in ("batch_size", "actors", "threads", "decode_batch_size", "decode_tasks"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"{name} must be an integer >= 0 (0: automatic), got {value!r}",
            )
        for name in ("cpus_per_actor", "gpus_per_actor", "decode_cpus"):
            value = getattr(self, name)
            check(
                isinstance(value, int | float) and value >= 0 and math.isfinite(value),
                f"{name} must be a number >= 0 (0: automatic), got {value!r}",
            )
        check(
            isinstance(self.read_threads, int) and 1 <= self.read_threads <= 64,
            f"read_threads must be an integer between 1 and 64, got {self.read_threads!r}",
        )
        check(
            isinstance(self.max_error_rate, int | float) and 0 <= self.max_error_rate <= 1,
            f"max_error_rate must be a share between 0 and 1, got {self.max_error_rate!r}",
        )
        check(
            isinstance(self.rows_per_part, int) and self.rows_per_part >= 1,
            f"rows_per_part must be an integer >= 1, got {self.rows_per_part!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> EmbedConfig:
        """A checked copy with ``changes`` (``None`` values ignored)."""
        return rconfig.replace(self, **changes)


def load_embed_config(source: Any = None, overrides: rconfig.Overrides = None) -> EmbedConfig:
    """An ``EmbedConfig`` from a dict, a YAML/JSON file (an ``embed:`` section alone is
    read) or nothing, plus overrides; unknown keys fail with the valid ones listed."""
    return rconfig.load_config(EmbedConfig, source, overrides, section="embed")


@dataclass(frozen=True)
class ResourcePlan:
    """Concrete numbers for one run (recorded in manifest.json)."""

    device: str
    precision: str
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    batch_size: int
    decode_cpus: float
    decode_batch_size: int
    decode_tasks: int
    decode_mode: str
    read_threads: int = 8
    waits_for_gpus: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_resources(cfg: EmbedConfig, cluster: ClusterView, rows: int = 0) -> ResourcePlan:
    """Decide actors, CPU/GPU shares, threads and batch sizes for ``cfg`` on ``cluster``
    for ``rows`` images (0: unknown, no cap from the work).

    The pool comes from :func:`reid_ray.runtime.plan_pool` (GPU: one actor per GPU, 1 CPU
    each, and an explicit ``device: cuda`` waits for GPU nodes instead of falling back;
    CPU: one actor per 8 CPUs holding the CPUs less Ray Data's reserve, threads = its
    share; automatic sizes capped by the work). Embedding adds: fp16 on GPU, batches of
    128 (64 with flip) on GPU and 32 on CPU, decoders on 1/4 CPU on small machines
    (< 8 CPUs) and 1 CPU otherwise; as many decoders as the CPUs the pool leaves free hold.
    """
    cpus = max(float(cluster.cpus), 1.0)
    on_cpu = cfg.device == "cpu" or (
        cfg.device == "auto"
        and not cfg.gpus_per_actor
        and cluster.gpus < 1
        and cluster.max_gpus < 1
    )
    per_actor = ROWS_PER_CPU_ACTOR if on_cpu else ROWS_PER_GPU_ACTOR
    work_cap = math.ceil(rows / per_actor) if rows else 0
    actors = cfg.actors
    if on_cpu and not actors:
        actors = max(1, int(cpus // CPUS_PER_CPU_ACTOR))
        actors = min(actors, work_cap) if work_cap else actors
    pool = plan_pool(
        cluster,
        device=cfg.device,
        actors=actors,
        cpus_per_actor=cfg.cpus_per_actor,
        gpus_per_actor=cfg.gpus_per_actor,
        max_actors=work_cap,
    )
    on_gpu = pool.device == "cuda"
    if on_gpu:
        precision = "fp16" if cfg.precision in ("auto", "fp16") else "fp32"
        batch = cfg.batch_size or (64 if cfg.flip else 128)
        decode_cpus = cfg.decode_cpus or 1.0
    else:
        if cfg.precision == "fp16":
            raise ConfigError("precision fp16 needs a GPU; on CPU use fp32 (or auto)")
        precision = "fp32"
        batch = cfg.batch_size or 32
        decode_cpus = cfg.decode_cpus or (0.25 if cpus < 8 else 1.0)
    used = pool.actors * pool.cpus_per_actor
    # a pool waiting for GPU nodes gets their CPUs too: only check what exists now
    if not pool.waits_for_gpus and used + decode_cpus > cpus + 1e-9:
        raise ConfigError(
            f"no CPU left for decoders: {pool.actors} actors x {pool.cpus_per_actor:g} CPUs + "
            f"{decode_cpus:g} per decoder > {cpus:g} CPUs; lower --cpus-per-actor"
        )
    free = max(cpus - used, decode_cpus)
    return ResourcePlan(
        device=pool.device,
        precision=precision,
        actors=pool.actors,
        cpus_per_actor=pool.cpus_per_actor,
        gpus_per_actor=pool.gpus_per_actor,
        threads=int(cfg.threads or pool.threads),
        batch_size=int(batch),
        decode_cpus=float(decode_cpus),
        decode_batch_size=int(cfg.decode_batch_size or batch),
        decode_tasks=int(cfg.decode_tasks or max(1, int(free / decode_cpus + 1e-9))),
        decode_mode=cfg.decode_mode,
        read_threads=cfg.read_threads,
        waits_for_gpus=pool.waits_for_gpus,
    )
