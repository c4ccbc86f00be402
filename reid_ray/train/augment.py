"""Re-ID augmentations on decoded uint8 batches, per sample, on the training device.

Images are decoded once, slightly larger than the input size; each step draws a random
resized crop of the whole crop, colour jitter, blur and random erasing per sample
(kornia), then normalises with the model's mean/std. Horizontal flip is off unless asked
for: the left and right flanks of an animal carry different patterns.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reid_ray.train.config import AugmentConfig


class TrainAugment(nn.Module):
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, h, w]`` float32, augmented and normalised."""

    def __init__(
        self,
        cfg: AugmentConfig,
        input_size: tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ):
        super().__init__()
        import kornia.augmentation as K

        ops: list[nn.Module] = [
            K.RandomResizedCrop(
                tuple(input_size), scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio)
            ),
        ]
        if cfg.jitter_p > 0:
            ops.append(
                K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p)
            )
        if cfg.blur_p > 0:
            kernel = 2 * math.ceil(2 * cfg.blur_sigma[1]) + 1
            ops.append(K.RandomGaussianBlur((kernel, kernel), tuple(cfg.blur_sigma), p=cfg.blur_p))
        if cfg.erase_p > 0:
            ops.append(
                K.RandomErasing(scale=(0.02, 0.25), ratio=(0.3, 3.3), value=0.0, p=cfg.erase_p)
            )
        if cfg.hflip:
            ops.append(K.RandomHorizontalFlip(p=0.5))
        self.ops = nn.Sequential(*ops)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected [N, H, W, 3] uint8 images, got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        x = self.ops(x).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std
