"""Models: one loader (``load``) for timm names, hub models and reid-ray checkpoints.

Reference spellings: ``timm:NAME`` (local pretrained weights, else a clear error),
``timm:NAME@/path/weights.safetensors``, ``timm-random:NAME``, ``hf-hub:ORG/NAME``, or a
checkpoint path; see :mod:`reid_ray.models.refs`.
"""

from reid_ray.models.loader import (
    CALIBRATION_FILE,
    CHECKPOINT_FILE,
    LoadedModel,
    load,
    load_checkpoint,
    read_checkpoint,
    read_heldout_ids,
    reid_net,
    save_checkpoint,
    write_heldout_ids,
)
from reid_ray.models.net import GeM, NetConfig, PooledBackbone, ReidNet
from reid_ray.models.preprocess import Preprocess
from reid_ray.models.refs import ModelRef, build_backbone, parse_ref

__all__ = [
    "CALIBRATION_FILE",
    "CHECKPOINT_FILE",
    "GeM",
    "LoadedModel",
    "ModelRef",
    "NetConfig",
    "PooledBackbone",
    "Preprocess",
    "ReidNet",
    "build_backbone",
    "load",
    "load_checkpoint",
    "parse_ref",
    "read_checkpoint",
    "read_heldout_ids",
    "reid_net",
    "save_checkpoint",
    "write_heldout_ids",
]
