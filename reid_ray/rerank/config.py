"""The re-ranking configuration: one frozen dataclass read by ``reid_ray.config.load_config``.

Defaults are chosen for a CPU machine (measured in docs/design.md and in
``benchmarks/results/rerank_throughput.json``): ALIKED or DISK at a long side of 512 px with
at most 512 keypoints keeps extraction around 0.2-0.8 s per image and LightGlue around
50-120 ms per pair on 2 threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reid_ray.config import check, check_choice, load_config, replace, to_dict
from reid_ray.rerank.registry import EXTRACTORS, LIGHTGLUE_EXTRACTORS
from reid_ray.runtime import DEVICES

MATCHERS = ("lightglue", "classical")
SCORES = ("auto", "inliers", "confidence")
GEOMETRIES = ("auto", "none", "homography", "fundamental")
CALIBRATIONS = ("isotonic", "logistic")
STAGES = ("features", "match")
#: The calibration pairs hold at least this many other-identity candidates per query (the
#: highest-ranked ones): what a caller needs to simulate "this individual is not in the
#: gallery" by dropping the query's own identity.
MIN_TOP_NEGATIVES = 5


@dataclass(frozen=True)
class RerankConfig:
    """Everything that decides the local scores and the fusion.

    Feature extraction (cached per image; the cache key is built from these fields):
      ``extractor`` disk | aliked | sift; ``max_keypoints`` per image; ``resize_long_side``
      (crops are resized, small ones upscaled, to this long side before extraction);
      ``use_bbox`` crop to the manifest's bbox; ``use_mask`` keep keypoints inside the
      manifest's mask when it has one.
    Matching: ``matcher`` lightglue | classical; ``score`` auto | inliers | confidence
      (auto: summed LightGlue match confidence, classical inlier count); ``geometry``
      auto | none | homography | fundamental (auto: none for LightGlue, homography with
      MAGSAC for the classical matcher); ``ratio`` for the classical ratio test;
      ``ransac_threshold`` in pixels of the resized image; ``filter_threshold`` LightGlue's
      match threshold; ``adaptive`` LightGlue's adaptive depth and width.
    Work: ``top_k`` candidates per query re-ranked; ``actors`` (0: one per GPU, else
      one single-threaded actor per CPU); ``cpus_per_actor``/``gpus_per_actor`` (0: automatic;
      ``gpus_per_actor`` applies to the GPU stages only, see :meth:`stage_device`);
      ``batch_size`` pairs per matcher call; ``queries_per_batch`` queries per Ray batch
      (and per resumable part file); ``cache_dir`` (None: ``<out>/features``); ``device``.
    Fusion: ``calibration`` isotonic | logistic (scikit-learn); ``calibration_queries``
      labelled gallery queries (seeded sample) whose pairs are matched for calibration:
      each query's first ``calibration_top_k`` candidates, its highest-ranked same-identity
      candidate, its ``calibration_negatives`` (>= 5) highest-ranked other-identity
      candidates and ``calibration_deep_negatives`` more sampled over the deeper ranks;
      ``min_negatives`` different-identity pairs at least, else the calibration is refused;
      ``calibration_folds`` folds (grouped by identity) choose the fusion weight, which must
      beat the global score's held-out mean average precision by ``weight_margin`` to be
      used; ``threshold`` on the calibrated top-1 probability for known vs new (None: 0.5);
      ``seed`` for the samples.
    """

    extractor: str = "aliked"
    matcher: str = "lightglue"
    max_keypoints: int = 512
    resize_long_side: int = 512
    use_bbox: bool = True
    use_mask: bool = True
    score: str = "auto"
    geometry: str = "auto"
    ratio: float = 0.8
    ransac_threshold: float = 6.0
    filter_threshold: float = 0.1
    adaptive: bool = True
    top_k: int = 100
    actors: int = 0
    cpus_per_actor: float = 0.0
    gpus_per_actor: float = 0.0
    batch_size: int = 16
    queries_per_batch: int = 4
    cache_dir: str | None = None
    device: str = "auto"
    calibration: str = "isotonic"
    calibration_queries: int = 100
    calibration_top_k: int = 10
    calibration_negatives: int = MIN_TOP_NEGATIVES
    calibration_deep_negatives: int = 5
    min_negatives: int = 20
    calibration_folds: int = 5
    weight_margin: float = 0.01
    threshold: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("extractor", self.extractor, EXTRACTORS)
        check_choice("matcher", self.matcher, MATCHERS)
        check_choice("score", self.score, SCORES)
        check_choice("geometry", self.geometry, GEOMETRIES)
        check_choice("calibration", self.calibration, CALIBRATIONS)
        check_choice("device", self.device, DEVICES)
        check(
            self.matcher != "lightglue" or self.extractor in LIGHTGLUE_EXTRACTORS,
            f"matcher 'lightglue' has pretrained weights for {', '.join(LIGHTGLUE_EXTRACTORS)} "
            f"features only, not {self.extractor!r}: use --matcher classical with sift",
        )
        for name in (
            "max_keypoints",
            "resize_long_side",
            "top_k",
            "batch_size",
            "queries_per_batch",
            "calibration_queries",
            "calibration_top_k",
            "calibration_folds",
        ):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be a positive integer, got {value!r}",
            )
        for name in ("actors", "calibration_deep_negatives", "min_negatives"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"{name} must be 0 or a positive integer, got {value!r}",
            )
        check(
            self.calibration_negatives >= MIN_TOP_NEGATIVES,
            f"calibration_negatives must be at least {MIN_TOP_NEGATIVES} (the open-set "
            f"decision simulates absent individuals with them), got {self.calibration_negatives}",
        )
        check(
            self.resize_long_side >= 32,
            f"resize_long_side must be at least 32 px, got {self.resize_long_side}",
        )
        for name in ("cpus_per_actor", "gpus_per_actor", "weight_margin"):
            check(
                float(getattr(self, name)) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}"
            )
        check(0.0 < float(self.ratio) <= 1.0, f"ratio must be in (0, 1], got {self.ratio!r}")
        check(
            float(self.ransac_threshold) > 0,
            f"ransac_threshold must be > 0 pixels, got {self.ransac_threshold!r}",
        )
        check(
            0.0 <= float(self.filter_threshold) < 1.0,
            f"filter_threshold must be in [0, 1), got {self.filter_threshold!r}",
        )
        check(
            self.threshold is None or 0.0 <= float(self.threshold) <= 1.0,
            f"threshold must be a probability in [0, 1], got {self.threshold!r}",
        )

    # -- derived settings -------------------------------------------------------------------
    @property
    def score_kind(self) -> str:
        if self.score != "auto":
            return self.score
        return "confidence" if self.matcher == "lightglue" else "inliers"

    @property
    def geometry_kind(self) -> str:
        if self.geometry != "auto":
            return self.geometry
        return "none" if self.matcher == "lightglue" else "homography"

    def stage_device(self, stage: str) -> str:
        """What a stage's actors run on. SIFT extraction (``stage`` "features") and the
        classical matcher ("match") are CPU code: a CPU pool whatever ``device``, never
        GPUs held idle. DISK/ALIKED extraction and LightGlue follow ``device`` (cuda asks
        Ray for GPUs, so an autoscaler adds GPU nodes)."""
        check_choice("stage", stage, STAGES)
        cpu_code = self.extractor == "sift" if stage == "features" else self.matcher == "classical"
        return "cpu" if cpu_code else self.device

    def feature_settings(self) -> dict[str, Any]:
        """The fields that decide the extracted features (part of the cache key)."""
        return {
            "extractor": self.extractor,
            "max_keypoints": self.max_keypoints,
            "resize_long_side": self.resize_long_side,
            "use_bbox": self.use_bbox,
            "use_mask": self.use_mask,
        }

    def match_settings(self) -> dict[str, Any]:
        """The fields that decide a pair's local score (with the feature settings)."""
        return {
            **self.feature_settings(),
            "matcher": self.matcher,
            "score": self.score_kind,
            "geometry": self.geometry_kind,
            "ratio": float(self.ratio) if self.matcher == "classical" else None,
            "ransac_threshold": (
                float(self.ransac_threshold) if self.geometry_kind != "none" else None
            ),
            "filter_threshold": (
                float(self.filter_threshold) if self.matcher == "lightglue" else None
            ),
            "adaptive": bool(self.adaptive) if self.matcher == "lightglue" else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> RerankConfig:
        """A validated copy with ``changes`` (``None`` values ignored)."""
        return replace(self, **changes)


def load_rerank_config(
    source: dict[str, Any] | str | RerankConfig | None = None, **overrides: Any
) -> RerankConfig:
    """``load_config(RerankConfig, source, overrides, section="rerank")``: a dict, a YAML/JSON
    file (local or s3://) or a config, plus overrides (``None`` ignored)."""
    return load_config(RerankConfig, source, overrides, section="rerank")
