"""Sub-centre ArcFace with dynamic, class-frequency margins (MiewID's loss).

pytorch-metric-learning's ``SubCenterArcFaceLoss`` does the sub-centre ArcFace: ``k``
weight vectors per class, the cosine to a class is the best of its ``k``, the target
class's angle gets ``theta + m`` and the logits are scaled by ``s``. It has one margin for
all classes. What it lacks, and this module adds, is one margin per class:

    m_c = a * n_c ** (-lambda) + b

with ``a, b`` chosen so the margins span ``[margin_min, margin]``: rare classes get the
large margin, frequent ones the small. (Ha et al., Google Landmark Recognition 2020;
MiewID uses the same scheme.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pytorch_metric_learning.losses import SubCenterArcFaceLoss

from reid_ray.errors import ConfigError


def dynamic_margins(
    class_counts: Sequence[int] | np.ndarray,
    margin: float = 0.5,
    margin_min: float = 0.05,
    margin_lambda: float = 0.25,
) -> np.ndarray:
    """Per-class margins (radians) from class image counts ``[C]`` -> ``[C]`` float64.

    ``n ** -lambda`` rescaled linearly into ``[margin_min, margin]``; when every class has
    the same count (or ``lambda == 0``), every class gets ``margin``.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ConfigError(f"class_counts must be one-dimensional, got shape {counts.shape}")
    if counts.size == 0:
        return np.zeros(0, dtype=np.float64)
    if (counts <= 0).any() or not np.isfinite(counts).all():
        raise ConfigError("class_counts must be positive: every class needs at least one image")
    if not 0.0 <= margin_min <= margin:
        raise ConfigError(f"need 0 <= margin_min <= margin, got {margin_min}, {margin}")
    raw = counts ** (-float(margin_lambda))
    lo, hi = raw.min(), raw.max()
    if hi - lo <= 1e-12 * hi:
        return np.full(counts.shape, float(margin))
    return margin_min + (raw - lo) / (hi - lo) * (margin - margin_min)


class DynamicSubCenterArcFaceLoss(SubCenterArcFaceLoss):
    """``SubCenterArcFaceLoss`` with a margin per class (radians, buffer ``class_margins``).

    ``loss(embeddings [B, D], labels [B])`` -> scalar. The weights ``W`` [D, C * k] are a
    parameter of this module: optimise them with the network. Call it on float32
    embeddings (under AMP, compute the loss outside autocast), as PML casts ``W`` to the
    embeddings' dtype.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margins: Sequence[float] | np.ndarray | torch.Tensor,
        scale: float = 30.0,
        sub_centers: int = 3,
        **kwargs,
    ):
        margins_t = torch.as_tensor(np.asarray(margins, dtype=np.float32))
        if margins_t.shape != (num_classes,):
            raise ConfigError(
                f"margins must have shape ({num_classes},), got {tuple(margins_t.shape)}"
            )
        if num_classes < 1:
            raise ConfigError("ArcFace needs at least one class")
        super().__init__(
            num_classes=num_classes,
            embedding_size=embedding_size,
            margin=math.degrees(float(margins_t.max())),  # PML takes degrees; unused below
            scale=scale,
            sub_centers=sub_centers,
            **kwargs,
        )
        self.register_buffer("class_margins", margins_t)
        self._batch_margins: torch.Tensor | None = None

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        # PML hands modify_cosine_of_target_classes the target cosines in batch order
        # (cosine[mask == 1], one per row): line the per-row margins up with them.
        self._batch_margins = self.class_margins.to(embeddings.device, embeddings.dtype)[labels]
        try:
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        finally:
            self._batch_margins = None

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        m = self._batch_margins
        angles = self.get_angles(cosine_of_target_classes)
        # cos(theta + m) while theta + m <= pi (monotonic), else ArcFace's linear fallback
        return torch.where(
            angles <= math.pi - m,
            torch.cos(angles + m),
            torch.cos(angles) - m * torch.sin(m),
        )
