"""Local features of one image: SIFT (no weights), DISK and ALIKED (pretrained, offline).

An image is prepared once: decoded, cropped to its bbox, resized so its long side is
``resize_long_side`` (small crops are upscaled: local features on ~100x185 px crops find too
few keypoints otherwise), and its mask, when the manifest has one, is cropped and resized
the same way. Keypoints are in pixels of the prepared image.

DISK and ALIKED run with kornia's implementations and the offline pretrained weight files
named in ``reid_ray.rerank.registry`` (the one table of extractors and matcher weights).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from reid_ray.errors import ImageError, ModelError
from reid_ray.rerank.config import RerankConfig
from reid_ray.rerank.registry import feature_spec, load_state_dict, weights_path

logger = logging.getLogger(__name__)

#: Bump when the extraction code changes what it returns for the same settings.
FEATURE_VERSION = 1


@dataclass
class LocalFeatures:
    """Keypoints ``(N, 2)`` x, y in prepared-image pixels, descriptors ``(N, D)``,
    detection scores ``(N,)``, the prepared image size ``(w, h)`` and the factor from
    the (cropped) original to the prepared image."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int]
    scale: float

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    def equals(self, other: LocalFeatures) -> bool:
        return (
            np.array_equal(self.keypoints, other.keypoints)
            and np.array_equal(self.descriptors, other.descriptors)
            and np.array_equal(self.scores, other.scores)
            and tuple(self.image_size) == tuple(other.image_size)
            and float(self.scale) == float(other.scale)
        )


def feature_fingerprint(cfg: RerankConfig) -> str:
    """A short key for the features ``cfg`` extracts: settings, weights, library version."""
    settings: dict[str, Any] = {**cfg.feature_settings(), "version": FEATURE_VERSION}
    if cfg.extractor == "sift":
        settings["opencv"] = _version("opencv-python-headless") or _version("opencv-python")
        settings["root_sift"] = True
    else:
        path = weights_path(feature_spec(cfg.extractor).weights)
        settings["weights"] = [os.path.basename(path), os.path.getsize(path)]
        settings["kornia"] = _version("kornia")
    blob = json.dumps(settings, sort_keys=True).encode()
    return f"{cfg.extractor}-{hashlib.sha1(blob).hexdigest()[:12]}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- image preparation --------------------------------------------------------------------------


def prepare_image(img: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    """Resize so the long side is ``long_side`` (up or down); returns the image and factor."""
    import cv2

    h, w = img.shape[:2]
    scale = long_side / max(h, w)
    if scale == 1.0:
        return np.ascontiguousarray(img), 1.0
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (nw, nh), interpolation=interp), float(scale)


def load_prepared(
    row: Mapping[str, Any], cfg: RerankConfig
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Decode, crop, resize one manifest row; returns image, mask (bool or None), factor.

    Raises ``ImageError`` with the reason for an unusable image or mask.
    """
    from reid_ray.data import load_image

    bbox = row.get("bbox") if cfg.use_bbox else None
    bbox = None if bbox is None else [float(v) for v in bbox]
    img = load_image(str(row["path"]), bbox=bbox)
    prepared, scale = prepare_image(img, cfg.resize_long_side)
    mask = None
    mask_path = row.get("mask") if cfg.use_mask else None
    if mask_path:
        try:
            raw = load_image(str(mask_path), bbox=bbox)
        except ImageError as exc:
            raise ImageError(f"mask {mask_path}: {exc}") from None
        if raw.shape[:2] != img.shape[:2]:
            raise ImageError(
                f"mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} px but the image "
                f"(after the bbox crop) is {img.shape[1]}x{img.shape[0]} px"
            )
        import cv2

        resized = cv2.resize(
            raw.max(axis=2), (prepared.shape[1], prepared.shape[0]), interpolation=cv2.INTER_NEAREST
        )
        mask = resized > 127
    return prepared, mask, scale


# -- extractors ---------------------------------------------------------------------------------


class Extractor:
    """Maps a prepared RGB uint8 image (and optional bool mask) to ``LocalFeatures``."""

    name = "base"

    def extract(
        self, img: np.ndarray, mask: np.ndarray | None = None, scale: float = 1.0
    ) -> LocalFeatures:
        raise NotImplementedError


class SiftExtractor(Extractor):
    """OpenCV SIFT with RootSIFT descriptors (L1-normalised, square-rooted, so L2-unit)."""

    name = "sift"

    def __init__(self, max_keypoints: int) -> None:
        import cv2

        self._sift = cv2.SIFT_create(nfeatures=int(max_keypoints))
        self.max_keypoints = int(max_keypoints)

    def extract(
        self, img: np.ndarray, mask: np.ndarray | None = None, scale: float = 1.0
    ) -> LocalFeatures:
        import cv2

        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        cv_mask = None if mask is None else mask.astype(np.uint8) * 255
        kps, desc = self._sift.detectAndCompute(gray, cv_mask)
        if desc is None or not kps:
            return _empty(img, scale, feature_spec(self.name).descriptor_dim)
        order = np.argsort([-k.response for k in kps], kind="stable")[: self.max_keypoints]
        kp = np.array([kps[i].pt for i in order], dtype=np.float32).reshape(-1, 2)
        sc = np.array([kps[i].response for i in order], dtype=np.float32)
        d = desc[order].astype(np.float32)
        d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-12)
        d = np.sqrt(d).astype(np.float32)
        return LocalFeatures(kp, d, sc, (img.shape[1], img.shape[0]), float(scale))


class _TorchExtractor(Extractor):
    def __init__(self, device: str) -> None:
        self.device = device

    def _tensor(self, img: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0
        return t.to(self.device)


class DiskExtractor(_TorchExtractor):
    """Pretrained DISK (depth checkpoint): the ``max_keypoints`` strongest NMS maxima."""

    name = "disk"

    def __init__(self, max_keypoints: int, device: str = "cpu") -> None:
        super().__init__(device)
        from kornia.feature import DISK

        model = DISK()
        state = load_state_dict(feature_spec(self.name).weights, device="cpu")
        model.load_state_dict(state["extractor"] if "extractor" in state else state)
        self.model = model.eval().to(device)
        self.max_keypoints = int(max_keypoints)

    def extract(
        self, img: np.ndarray, mask: np.ndarray | None = None, scale: float = 1.0
    ) -> LocalFeatures:
        import torch
        import torch.nn.functional as F
        from kornia.feature.disk.detector import heatmap_to_keypoints

        t = self._tensor(img)
        h, w = t.shape[-2:]
        pad_h, pad_w = (16 - h % 16) % 16, (16 - w % 16) % 16
        with torch.inference_mode():
            heat, dense = self.model.heatmap_and_dense_descriptors(F.pad(t, (0, pad_w, 0, pad_h)))
            heat, dense = heat[..., :h, :w], dense[..., :h, :w]
            if mask is not None:
                m = torch.from_numpy(np.ascontiguousarray(mask)).to(heat.device)
                heat = heat.masked_fill(~m[None, None], -1e4)
            kps = heatmap_to_keypoints(
                heat, n=self.max_keypoints, window_size=5, score_threshold=0.0
            )
            feats = kps[0].merge_with_descriptors(dense[0])
        return LocalFeatures(
            feats.keypoints.float().cpu().numpy().astype(np.float32).reshape(-1, 2),
            feats.descriptors.float()
            .cpu()
            .numpy()
            .astype(np.float32)
            .reshape(-1, feature_spec(self.name).descriptor_dim),
            feats.detection_scores.float().cpu().numpy().astype(np.float32).reshape(-1),
            (int(w), int(h)),
            float(scale),
        )


class AlikedExtractor(_TorchExtractor):
    """Pretrained ALIKED-N16: the ``max_keypoints`` strongest maxima of its score map."""

    name = "aliked"

    def __init__(self, max_keypoints: int, device: str = "cpu") -> None:
        super().__init__(device)
        from kornia.feature.aliked.aliked import ALIKED

        # top-k mode (threshold <= 0): a fixed keypoint budget per image, so pairs batch.
        model = ALIKED(
            model_name="aliked-n16", max_num_keypoints=int(max_keypoints), detection_threshold=-1.0
        )
        result = model.load_state_dict(
            load_state_dict(feature_spec(self.name).weights, device="cpu"), strict=False
        )
        params = dict(model.named_parameters())
        missing = [k for k in result.missing_keys if k in params]
        if missing or result.unexpected_keys:
            raise ModelError(
                f"ALIKED weights do not fit the model: missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}"
            )
        self.model = model.eval().to(device)

    def extract(
        self, img: np.ndarray, mask: np.ndarray | None = None, scale: float = 1.0
    ) -> LocalFeatures:
        import torch

        t = self._tensor(img)
        h, w = t.shape[-2:]
        with torch.inference_mode():
            m = None
            if mask is not None:
                m = torch.from_numpy(np.ascontiguousarray(mask)).to(t.device)[None, None].float()
            lafs, responses, descs = self.model.forward_laf(t, mask=m, compute_affine=False)
        kp = lafs[0, :, :, 2].float().cpu().numpy().astype(np.float32).reshape(-1, 2)
        return LocalFeatures(
            kp,
            descs[0].float().cpu().numpy().astype(np.float32).reshape(-1, descs.shape[-1]),
            responses[0, :, 0].float().cpu().numpy().astype(np.float32).reshape(-1),
            (int(w), int(h)),
            float(scale),
        )


EXTRACTOR_CLASSES = {cls.name: cls for cls in (SiftExtractor, DiskExtractor, AlikedExtractor)}


def build_extractor(cfg: RerankConfig, device: str = "cpu") -> Extractor:
    """The extractor of ``cfg`` (a row of ``registry.LOCAL_FEATURES``) on ``device``."""
    feature_spec(cfg.extractor)  # unknown names fail with the list of known ones
    cls = EXTRACTOR_CLASSES.get(cfg.extractor)
    if cls is None:
        raise ModelError(f"extractor {cfg.extractor!r} has no implementation in features.py")
    if cls is SiftExtractor:
        return cls(cfg.max_keypoints)
    return cls(cfg.max_keypoints, device)


def _empty(img: np.ndarray, scale: float, dim: int) -> LocalFeatures:
    return LocalFeatures(
        np.zeros((0, 2), np.float32),
        np.zeros((0, dim), np.float32),
        np.zeros((0,), np.float32),
        (img.shape[1], img.shape[0]),
        float(scale),
    )
