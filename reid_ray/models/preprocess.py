"""Preprocessing that travels with a model: size, normalisation, interpolation, resize mode."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a model. Re-ID resizes the whole crop (no centre crop)."""

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize_mode: str = "resize"  # or "letterbox"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        known = {
            k: d[k] for k in ("input_size", "mean", "std", "interpolation", "resize_mode") if k in d
        }
        for k in ("input_size", "mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    def with_size(self, size: int | tuple[int, int] | None) -> Preprocess:
        if size is None:
            return self
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return Preprocess(hw, self.mean, self.std, self.interpolation, self.resize_mode)

    def prepare(self, img: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 crop -> input_size uint8 (normalisation happens on the batch tensor)."""
        from reid_ray.data.images import resize_image

        return resize_image(img, self.input_size, self.resize_mode, self.interpolation)

    def normalize(self, batch_uint8):
        """NxHxWx3 uint8 (numpy or torch) -> Nx3xHxW float32 normalised torch tensor."""
        import torch

        x = torch.as_tensor(batch_uint8)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std
