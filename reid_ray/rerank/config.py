"""The re-ranking configuration: one frozen dataclass, one loader that rejects unknown keys.

Defaults are chosen for a CPU machine (measured in ENVIRONMENT.md and in
``benchmarks/results/rerank_throughput.json``): ALIKED or DISK at a long side of 512 px with
at most 512 keypoints keeps extraction around 0.2-0.8 s per image and LightGlue around
50-120 ms per pair on 2 threads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from reid_ray.errors import ConfigError

EXTRACTORS = ("disk", "aliked", "sift")
MATCHERS = ("lightglue", "classical")
SCORES = ("auto", "inliers", "confidence")
GEOMETRIES = ("auto", "none", "homography", "fundamental")
CALIBRATIONS = ("isotonic", "logistic")
DEVICES = ("auto", "cpu", "cuda")

#: Extractors that have pretrained LightGlue weights in the offline package.
LIGHTGLUE_EXTRACTORS = ("disk", "aliked")


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
      one single-threaded actor per CPU); ``cpus_per_actor``/``gpus_per_actor`` (0: automatic);
      ``batch_size`` pairs per matcher call; ``queries_per_batch`` queries per Ray batch
      (and per resumable part file); ``cache_dir`` (None: ``<out>/features``); ``device``.
    Fusion: ``calibration`` isotonic | logistic; ``calibration_queries`` and
      ``calibration_top_k`` bound the labelled gallery pairs matched for calibration;
      ``threshold`` on the calibrated top-1 probability for known vs new (None: 0.5);
      ``seed`` for the calibration sample.
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
    threshold: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("extractor", self.extractor, EXTRACTORS)
        _check_choice("matcher", self.matcher, MATCHERS)
        _check_choice("score", self.score, SCORES)
        _check_choice("geometry", self.geometry, GEOMETRIES)
        _check_choice("calibration", self.calibration, CALIBRATIONS)
        _check_choice("device", self.device, DEVICES)
        if self.matcher == "lightglue" and self.extractor not in LIGHTGLUE_EXTRACTORS:
            raise ConfigError(
                f"matcher 'lightglue' has pretrained weights for {', '.join(LIGHTGLUE_EXTRACTORS)} "
                f"features only, not {self.extractor!r}: use --matcher classical with sift"
            )
        for name in (
            "max_keypoints",
            "resize_long_side",
            "top_k",
            "batch_size",
            "queries_per_batch",
            "calibration_queries",
            "calibration_top_k",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.resize_long_side < 32:
            raise ConfigError(
                f"resize_long_side must be at least 32 px, got {self.resize_long_side}"
            )
        for name in ("actors",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"{name} must be 0 (automatic) or a positive integer, got {value!r}"
                )
        for name in ("cpus_per_actor", "gpus_per_actor"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 < float(self.ratio) <= 1.0:
            raise ConfigError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if float(self.ransac_threshold) <= 0:
            raise ConfigError(f"ransac_threshold must be > 0 pixels, got {self.ransac_threshold!r}")
        if not 0.0 <= float(self.filter_threshold) < 1.0:
            raise ConfigError(f"filter_threshold must be in [0, 1), got {self.filter_threshold!r}")
        if self.threshold is not None and not 0.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"threshold must be a probability in [0, 1], got {self.threshold!r}")

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
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RerankConfig:
        return load_rerank_config(self.to_dict(), **changes)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


_INT_FIELDS = {f.name for f in fields(RerankConfig) if f.type in ("int",)}
_FLOAT_FIELDS = {f.name for f in fields(RerankConfig) if f.type in ("float", "float | None")}
_BOOL_FIELDS = {f.name for f in fields(RerankConfig) if f.type == "bool"}


def load_rerank_config(
    source: dict[str, Any] | str | None = None, **overrides: Any
) -> RerankConfig:
    """A ``RerankConfig`` from a dict or a YAML/JSON file (local or s3://), plus overrides.

    Unknown keys raise ``ConfigError`` naming them and the valid keys. ``None`` overrides
    are ignored (an unset CLI option keeps the file's or the default value).
    """
    data: dict[str, Any] = {}
    if isinstance(source, str):
        data = _read_config_file(source)
    elif isinstance(source, dict):
        data = dict(source)
    elif source is not None:
        raise ConfigError(f"a rerank config is a dict or a file path, not {type(source).__name__}")
    if "rerank" in data and isinstance(data["rerank"], dict) and len(data) == 1:
        data = dict(data["rerank"])
    data.update({k: v for k, v in overrides.items() if v is not None})
    valid = {f.name for f in fields(RerankConfig)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(
            f"unknown rerank setting(s): {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    coerced: dict[str, Any] = {}
    for key, value in data.items():
        coerced[key] = _coerce(key, value)
    return RerankConfig(**coerced)


def _coerce(key: str, value: Any) -> Any:
    try:
        if value is None:
            return None
        if key in _BOOL_FIELDS:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if key in _INT_FIELDS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if key in _FLOAT_FIELDS:
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"rerank setting {key}: bad value {value!r}") from None
    return value


def _read_config_file(path: str) -> dict[str, Any]:
    import yaml

    from reid_ray import io as rio

    try:
        text = rio.read_bytes(path).decode()
    except FileNotFoundError:
        raise ConfigError(f"rerank config not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"rerank config {path} is not valid YAML/JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"rerank config {path} must hold a mapping of settings")
    return data
