"""Training configuration: frozen dataclasses read by :func:`reid_ray.config.load_config`.

A job file (``jobs/configs/train_arcface.yaml``) holds the run's inputs and outputs
(``manifest``, ``split``, ``out``, ``resume``) and a ``train:`` section whose keys are the
fields of :class:`TrainConfig` (with ``loss:`` and ``augment:`` sub-sections). A misspelled
key fails with a :class:`~reid_ray.errors.ConfigError` naming it and the allowed keys.

Margins are in radians (0.5 rad is ArcFace's usual 28.6 degrees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from reid_ray.config import check, load_config, to_dict

SAMPLERS = ("random", "pk")
FEEDS = ("shards", "decode")
SHARD_FORMATS = ("jpeg", "png", "raw")
POOLINGS = ("gem", "avg")
RESIZE_MODES = ("resize", "letterbox")


@dataclass(frozen=True)
class LossConfig:
    """Sub-centre ArcFace with dynamic (class-frequency) margins, as in MiewID.

    Class ``c`` with ``n_c`` training images gets ``n_c ** -margin_lambda``, rescaled
    linearly into ``[margin_min, margin]``: the rarest class gets ``margin``, the most
    frequent ``margin_min``. ``margin_min == margin`` is plain (static) ArcFace.
    """

    scale: float = 30.0
    margin: float = 0.5
    margin_min: float = 0.05
    margin_lambda: float = 0.25
    sub_centers: int = 3

    def validate(self) -> None:
        check(self.scale > 0, f"loss.scale must be > 0, got {self.scale}")
        check(
            0.0 <= self.margin_min <= self.margin < math.pi / 2,
            "loss margins must satisfy 0 <= margin_min <= margin < pi/2 (radians), got "
            f"margin_min={self.margin_min}, margin={self.margin}",
        )
        check(self.margin_lambda >= 0, f"loss.margin_lambda must be >= 0, got {self.margin_lambda}")
        check(self.sub_centers >= 1, f"loss.sub_centers must be >= 1, got {self.sub_centers}")


@dataclass(frozen=True)
class AugmentConfig:
    """Re-ID augmentations on decoded uint8 batches (kornia, per sample).

    Horizontal flips are off by default: an animal's left and right flanks carry different
    patterns, so a flipped left flank is not the same individual's right flank.
    """

    decode_scale: float = 1.15  # images are decoded once at image_size * decode_scale
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.2
    hue: float = 0.03
    jitter_p: float = 0.8
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    erase_p: float = 0.0  # random erasing (occlusion), probability per image
    hflip: bool = False

    def validate(self) -> None:
        check(
            self.decode_scale >= 1.0, f"augment.decode_scale must be >= 1, got {self.decode_scale}"
        )
        lo, hi = self.crop_scale
        check(
            0 < lo <= hi <= 1,
            f"augment.crop_scale must be 0 < lo <= hi <= 1, got {self.crop_scale}",
        )
        lo, hi = self.crop_ratio
        check(0 < lo <= hi, f"augment.crop_ratio must be 0 < lo <= hi, got {self.crop_ratio}")
        for name in ("jitter_p", "blur_p", "erase_p"):
            v = getattr(self, name)
            check(0 <= v <= 1, f"augment.{name} must be in [0, 1], got {v}")
        check(0 <= self.hue <= 0.5, f"augment.hue must be in [0, 0.5], got {self.hue}")
        lo, hi = self.blur_sigma
        check(0 < lo <= hi, f"augment.blur_sigma must be 0 < lo <= hi, got {self.blur_sigma}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``None`` means "from the model": a checkpoint keeps its own size, neck
    and pooling; a ``timm:`` backbone gets 224 px, a 512-d neck and GeM."""

    model: str = "timm:efficientnet_lite0"
    image_size: int | None = None
    embedding_dim: int | None = None
    pooling: str | None = None
    gem_p: float = 3.0
    resize_mode: str | None = None
    epochs: int = 10
    workers: int = 2
    cpus_per_worker: float | None = None  # None: one node's CPUs shared out (runtime.plan_pool)
    gpus_per_worker: float = 0.0
    batch_size: int = 16  # per worker
    sampler: str = "random"  # or "pk": P identities x K images per batch
    pk_k: int = 4
    lr: float = 2e-3
    backbone_lr_mult: float = 1.0
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    # epochs at the start that train only the neck and ArcFace head, the backbone frozen
    # (weights and BatchNorm statistics), at most half the run (the backbone always
    # trains): a new head's first gradients are noise, and they wrecked pretrained features
    # (dog faces: val mAP 0.753 at the start, 0.552 after epoch 1 without, 0.737 with it).
    # The backbone's own warmup and schedule start after them (LP-FT). 0 turns it off.
    head_warmup_epochs: float = 1.0
    # keep the backbone's BatchNorm layers on their pretrained statistics (eval mode) all
    # through training, for tiny per-worker batches; on the dog faces it made fine-tuning
    # much worse (val mAP 0.408 after epoch 2 vs 0.680), so it is off by default
    freeze_backbone_bn: bool = False
    min_lr_ratio: float = 0.02
    grad_clip: float = 5.0  # max gradient norm; 0 disables clipping
    amp: bool = True  # mixed precision on GPU (ignored on CPU)
    shuffle_buffer: int = 512
    val_batch_size: int = 64
    keep_checkpoints: int = 2  # best by validation mAP; the latest is always kept too
    max_failures: int = 2  # worker crashes survived (restart from the last checkpoint)
    seed: int = 0
    # whole identities kept out of training for open-set calibration (issue 14):
    # this fraction of the labelled identities when there are at least
    # calibration_min_identities of them, else none; drawn with ``seed``
    calibration_fraction: float = 0.1
    calibration_min_identities: int = 20
    decoded_cache_mb: int = 1024  # decoded sets up to this size stay in the object store
    # where each epoch's images come from: "shards" (every image decoded, cropped and
    # resized once into Parquet shards, read back small every epoch and reused by later
    # runs with the same input size) or "decode" (the original files decoded again every
    # epoch on at most 8 half-CPU tasks: the former path, kept to measure against)
    feed: str = "shards"
    shard_cache: str | None = None  # the shards' folder (local or s3://); None: OUT/shards
    shard_format: str = "jpeg"  # jpeg (at shard_quality), png, or raw uint8 (exact, ~8x larger)
    shard_quality: int = 95
    val_top_k: int = 100  # validation ranks each image's FAISS top-K (mAP@K)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> TrainConfig:
        check(
            bool(self.model.strip()),
            "model must be a reference (timm:NAME, "
            "timm-random:NAME, hf-hub:ORG/NAME or a checkpoint)",
        )
        check(
            self.image_size is None or 16 <= self.image_size <= 2048,
            f"image_size must be in [16, 2048], got {self.image_size}",
        )
        check(
            self.embedding_dim is None or self.embedding_dim >= 1,
            f"embedding_dim must be >= 1, got {self.embedding_dim}",
        )
        check(
            self.pooling is None or self.pooling in POOLINGS,
            f"pooling must be one of {POOLINGS}, got {self.pooling!r}",
        )
        check(
            self.resize_mode is None or self.resize_mode in RESIZE_MODES,
            f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}",
        )
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        check(
            self.cpus_per_worker is None or self.cpus_per_worker > 0,
            f"cpus_per_worker must be > 0, got {self.cpus_per_worker}",
        )
        check(
            self.gpus_per_worker >= 0, f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}"
        )
        check(self.batch_size >= 2, f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        check(self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "pk":
            check(
                self.pk_k >= 1
                and self.batch_size % self.pk_k == 0
                and self.batch_size // self.pk_k >= 2,
                f"sampler pk needs batch_size = P x pk_k with P >= 2; got batch_size="
                f"{self.batch_size}, pk_k={self.pk_k}",
            )
        for name in ("lr", "backbone_lr_mult", "head_lr_mult"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        check(
            self.head_warmup_epochs >= 0,
            f"head_warmup_epochs must be >= 0, got {self.head_warmup_epochs}",
        )
        check(
            0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
        )
        check(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        check(self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        check(self.val_batch_size >= 1, f"val_batch_size must be >= 1, got {self.val_batch_size}")
        check(
            self.keep_checkpoints >= 1,
            f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}",
        )
        check(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")
        check(
            0 <= self.calibration_fraction < 1,
            f"calibration_fraction must be in [0, 1), got {self.calibration_fraction}",
        )
        check(
            self.calibration_min_identities >= 2,
            f"calibration_min_identities must be >= 2, got {self.calibration_min_identities}",
        )
        check(
            self.decoded_cache_mb >= 0,
            f"decoded_cache_mb must be >= 0, got {self.decoded_cache_mb}",
        )
        check(self.feed in FEEDS, f"feed must be one of {FEEDS}, got {self.feed!r}")
        check(
            self.shard_format in SHARD_FORMATS,
            f"shard_format must be one of {SHARD_FORMATS}, got {self.shard_format!r}",
        )
        check(
            50 <= self.shard_quality <= 100,
            f"shard_quality must be in [50, 100], got {self.shard_quality}",
        )
        check(self.val_top_k >= 1, f"val_top_k must be >= 1, got {self.val_top_k}")
        self.loss.validate()
        self.augment.validate()
        return self

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass(frozen=True)
class JobConfig:
    """A training job: where the data is, where the run goes, and the training config."""

    manifest: str | None = None
    split: str | None = None
    out: str | None = None
    resume: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)


def load_job_config(source: str | dict | None = None, overrides=None) -> JobConfig:
    """A YAML job file (local or ``s3://``) or a dict as a validated :class:`JobConfig`."""
    return load_config(JobConfig, source, overrides)
