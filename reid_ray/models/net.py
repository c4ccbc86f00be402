"""The re-ID network: a timm backbone, GeM (or average) pooling and an embedding neck.

As in MiewID: backbone features -> GeM -> linear projection -> BatchNorm, a compact
embedding trained with (sub-centre) ArcFace. Without a neck it is the backbone's own
pooled feature, which is what an ImageNet model gives out of the box.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    backbone: str = "resnet18"
    pooling: str = "gem"  # "gem" | "avg"
    embedding_dim: int = 512  # 0: no neck, the pooled backbone feature is the embedding
    gem_p: float = 3.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown NetConfig keys: {sorted(unknown)}")
        return cls(**d)


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent (p=1 average, p->inf max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / self.p)


class ReidNet(nn.Module):
    """Backbone + pooling + optional Linear/BatchNorm neck; returns unnormalised embeddings."""

    def __init__(self, cfg: NetConfig, backbone: nn.Module | None = None):
        super().__init__()
        import timm

        self.cfg = cfg
        self.backbone = backbone or timm.create_model(
            cfg.backbone, pretrained=False, num_classes=0, global_pool=""
        )
        features = self.backbone.num_features
        self.pool = GeM(cfg.gem_p) if cfg.pooling == "gem" else nn.AdaptiveAvgPool2d(1)
        if cfg.embedding_dim:
            self.neck = nn.Sequential(
                nn.Linear(features, cfg.embedding_dim, bias=False),
                nn.BatchNorm1d(cfg.embedding_dim),
            )
            self.embedding_dim = cfg.embedding_dim
        else:
            self.neck = nn.Identity()
            self.embedding_dim = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(x)
        if feats.ndim == 3:  # transformers: tokens -> mean over tokens
            pooled = feats.mean(dim=1)
        else:
            pooled = self.pool(feats).flatten(1)
        return self.neck(pooled)


class PooledBackbone(nn.Module):
    """A timm classifier-free model (``num_classes=0``): its pooled feature is the embedding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embedding_dim = model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
