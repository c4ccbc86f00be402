"""Models: one loader (``load``) for timm names, hub models and reid-ray checkpoints."""

from reid_ray.models.loader import (
    CHECKPOINT_FILE,
    LoadedModel,
    build_backbone,
    load,
    load_checkpoint,
    parse_ref,
    read_checkpoint,
    save_checkpoint,
)
from reid_ray.models.net import GeM, NetConfig, PooledBackbone, ReidNet
from reid_ray.models.preprocess import Preprocess

__all__ = [
    "CHECKPOINT_FILE",
    "GeM",
    "LoadedModel",
    "NetConfig",
    "PooledBackbone",
    "Preprocess",
    "ReidNet",
    "build_backbone",
    "load",
    "load_checkpoint",
    "parse_ref",
    "read_checkpoint",
    "save_checkpoint",
]
