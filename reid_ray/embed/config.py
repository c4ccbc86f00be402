"""Embedding settings and the resource plan derived from them and the cluster.

``EmbedConfig`` is what the user may set (0 / "auto" means "decide from the cluster");
``plan_resources`` turns it and the cluster's CPU/GPU count into concrete numbers. Both are
pure, so the defaults are unit-tested without Ray.

Defaults, measured on a 2-core machine (``benchmarks/results/embed_throughput.json``):
one inference actor holding most of the CPU with as many torch threads as its share,
decode tasks on fractional CPUs beside it. On a GPU cluster: one actor per GPU with half
precision, decode tasks on the CPUs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from reid_ray.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16")


@dataclass(frozen=True)
class EmbedConfig:
    """User-facing embedding settings; 0 or "auto" means chosen from the cluster.

    ``image_size`` overrides the model's input side (None: the model's own).
    ``flip`` adds horizontal-flip test-time augmentation (features of the image and of its
    mirror summed, then L2-normalised; it changes the stored fingerprint).
    ``batch_size`` images per inference call; ``actors`` size of the inference pool;
    ``cpus_per_actor``/``threads`` CPU share and torch threads of each actor;
    ``decode_cpus`` CPU share of each decode task; ``decode_batch_size`` images per decode
    task call; ``decode_tasks`` most decoders at a time (0: the CPUs the inference actors
    leave free, divided by ``decode_cpus``); ``decode_mode`` actors (long-lived decoder
    actors, the default) or tasks (one Ray task per block); ``rows_per_part`` rows per Parquet part (the unit of resume);
    ``flush_seconds`` a part is also written after this long, so slow runs checkpoint;
    ``device`` auto | cpu | cuda; ``precision`` auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16.
    """

    image_size: int | None = None
    flip: bool = False
    batch_size: int = 0
    actors: int = 0
    cpus_per_actor: float = 0.0
    threads: int = 0
    decode_cpus: float = 0.0
    decode_batch_size: int = 0
    decode_tasks: int = 0
    decode_mode: str = "actors"
    rows_per_part: int = 2048
    flush_seconds: float = 60.0
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.image_size is not None and not (16 <= int(self.image_size) <= 4096):
            raise ConfigError(f"image_size must be between 16 and 4096, got {self.image_size}")
        for name in ("batch_size", "actors", "threads", "decode_batch_size", "decode_tasks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0 (0: automatic), got {value!r}")
        for name in ("cpus_per_actor", "decode_cpus"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
                raise ConfigError(f"{name} must be a number >= 0 (0: automatic), got {value!r}")
        if self.decode_mode not in ("actors", "tasks"):
            raise ConfigError(f"decode_mode must be actors or tasks, got {self.decode_mode!r}")
        if not isinstance(self.rows_per_part, int) or self.rows_per_part < 1:
            raise ConfigError(f"rows_per_part must be an integer >= 1, got {self.rows_per_part!r}")
        if not self.flush_seconds > 0:
            raise ConfigError(f"flush_seconds must be > 0, got {self.flush_seconds!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown embed setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> EmbedConfig:
        return replace(self, **changes)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_resources(cfg: EmbedConfig, cluster_cpus: float, cluster_gpus: float) -> ResourcePlan:
    """Decide actors, CPU/GPU shares, threads and batch sizes for ``cfg`` on a cluster.

    GPU (any GPU in the cluster and device auto|cuda): one actor per GPU (1 GPU, 1 CPU
    each), fp16 autocast, batches of 128 (64 with flip), decode tasks on 1 CPU each.
    CPU: one actor per 8 CPUs; together the actors hold 3/4 of the CPUs (in quarters, at
    least 1 CPU each where there is more than one) and run that many torch threads;
    decode tasks take 1/4 CPU on small machines (< 8 CPUs) and 1 CPU otherwise, so reads
    are never starved (two actors holding every CPU of a 2-core machine hang the read
    tasks: ENVIRONMENT.md); batches of 32.
    """
    cpus = max(float(cluster_cpus), 1.0)
    gpus = float(cluster_gpus)
    if cfg.device == "cuda" and gpus < 1:
        raise ConfigError("device 'cuda' requested but the Ray cluster has no GPU")
    use_gpu = gpus >= 1 and cfg.device in ("auto", "cuda")
    if use_gpu:
        actors = cfg.actors or max(1, int(gpus))
        if actors > gpus:
            raise ConfigError(f"{actors} GPU actors requested but the cluster has {gpus:g} GPUs")
        cpus_per_actor = cfg.cpus_per_actor or 1.0
        threads = cfg.threads or max(1, int(cpus_per_actor))
        batch = cfg.batch_size or (64 if cfg.flip else 128)
        precision = "fp16" if cfg.precision in ("auto", "fp16") else "fp32"
        decode_cpus = cfg.decode_cpus or 1.0
        gpus_per_actor = 1.0
        device = "cuda"
    else:
        if cfg.precision == "fp16":
            raise ConfigError("precision fp16 needs a GPU; on CPU use fp32 (or auto)")
        actors = cfg.actors or max(1, int(cpus // 8))
        if cfg.cpus_per_actor:
            cpus_per_actor = float(cfg.cpus_per_actor)
        else:
            cpus_per_actor = max(min(1.0, cpus * 0.75), round(cpus * 0.75 / actors * 4) / 4)
        if actors * cpus_per_actor > cpus:
            raise ConfigError(
                f"{actors} actors x {cpus_per_actor:g} CPUs exceed the cluster's {cpus:g} CPUs"
            )
        threads = cfg.threads or max(1, math.ceil(cpus_per_actor))
        batch = cfg.batch_size or 32
        precision = "fp32"
        decode_cpus = cfg.decode_cpus or (0.25 if cpus < 8 else 1.0)
        gpus_per_actor = 0.0
        device = "cpu"
    if actors * cpus_per_actor + decode_cpus > cpus + 1e-9:
        raise ConfigError(
            f"no CPU left for decode tasks: {actors} actors x {cpus_per_actor:g} CPUs + "
            f"{decode_cpus:g} per decode task > {cpus:g} CPUs; lower --cpus-per-actor"
        )
    free = cpus - actors * cpus_per_actor
    decode_tasks = cfg.decode_tasks or max(1, int(free / decode_cpus + 1e-9))
    return ResourcePlan(
        device=device,
        precision=precision,
        actors=int(actors),
        cpus_per_actor=float(cpus_per_actor),
        gpus_per_actor=gpus_per_actor,
        threads=int(threads),
        batch_size=int(batch),
        decode_cpus=float(decode_cpus),
        decode_batch_size=int(cfg.decode_batch_size or batch),
        decode_tasks=int(decode_tasks),
        decode_mode=cfg.decode_mode,
    )
