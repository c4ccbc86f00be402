"""Matchers for one query's features against its candidates' features, and a pair's score.

* ``LightGlueMatcher``: kornia's LightGlue with the pretrained DISK or ALIKED weights from
  the offline package, adaptive depth (early stop) and width (point pruning) on. Candidates
  with the same number of keypoints run as one batch (the query repeated); kornia runs the
  pairs of a batch one at a time where it prunes points, so a pair's matches do not depend
  on its batch on the CPU.
* ``ClassicalMatcher``: weight-free mutual nearest neighbours with Lowe's ratio test.
* Geometric verification (optional for LightGlue, on for the classical matcher): MAGSAC
  (OpenCV USAC) homography or fundamental matrix; the inliers survive.
* The score of a pair: the number of surviving matches (``inliers``) or the sum of their
  confidence (``confidence``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from reid_ray.errors import ModelError
from reid_ray.rerank.config import RerankConfig
from reid_ray.rerank.features import LocalFeatures
from reid_ray.rerank.registry import feature_spec, load_state_dict

logger = logging.getLogger(__name__)


@dataclass
class MatchResult:
    """Correspondences of one pair: ``matches`` ``(K, 2)`` indices into the query's and the
    candidate's keypoints, ``confidence`` ``(K,)``, ``inliers`` ``(K,)`` bool (all True
    without geometric verification)."""

    matches: np.ndarray
    confidence: np.ndarray
    inliers: np.ndarray

    @classmethod
    def empty(cls) -> MatchResult:
        return cls(np.zeros((0, 2), np.int64), np.zeros((0,), np.float32), np.zeros((0,), bool))

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())

    def score(self, kind: str) -> float:
        if kind == "inliers":
            return float(self.inliers.sum())
        if kind == "confidence":
            return float(self.confidence[self.inliers].astype(np.float64).sum())
        raise ValueError(f"unknown score kind {kind!r}")


# -- classical ----------------------------------------------------------------------------------


def mutual_ratio_matches(
    desc0: np.ndarray, desc1: np.ndarray, ratio: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours that pass Lowe's ratio test.

    ``desc0`` ``(M, D)``, ``desc1`` ``(N, D)``, L2-normalised rows. Returns matches
    ``(K, 2)`` int64 and confidence ``1 - d1/d2`` ``(K,)`` float32 (d1, d2: distances to
    the nearest and second-nearest neighbour in ``desc1``; with one candidate point the
    ratio test cannot reject and the confidence is 1).
    """
    m, n = len(desc0), len(desc1)
    if m == 0 or n == 0:
        return np.zeros((0, 2), np.int64), np.zeros((0,), np.float32)
    if desc0.shape[1] != desc1.shape[1]:
        raise ValueError(f"descriptor dimensions differ: {desc0.shape[1]} vs {desc1.shape[1]}")
    sim = desc0.astype(np.float32) @ desc1.astype(np.float32).T
    dist = np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))
    nn01 = np.argmin(dist, axis=1)
    nn10 = np.argmin(dist, axis=0)
    d1 = dist[np.arange(m), nn01]
    if n > 1:
        d2 = np.partition(dist, 1, axis=1)[:, 1]
    else:
        d2 = np.full(m, np.inf, dtype=dist.dtype)
    mutual = nn10[nn01] == np.arange(m)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(d2 > 0, d1 / d2, 1.0)
    keep = mutual & (rel < ratio)
    idx0 = np.nonzero(keep)[0]
    matches = np.stack([idx0, nn01[idx0]], axis=1).astype(np.int64)
    conf = (1.0 - rel[idx0]).astype(np.float32)
    return matches, conf


def verify_geometry(
    kp0: np.ndarray, kp1: np.ndarray, matches: np.ndarray, method: str, threshold: float
) -> np.ndarray:
    """Inlier mask ``(K,)`` of ``matches`` under a MAGSAC homography or fundamental matrix.

    ``none`` keeps every match; too few matches for the model (4 / 8) keep none.
    """
    k = len(matches)
    if method == "none":
        return np.ones(k, dtype=bool)
    need = {"homography": 4, "fundamental": 8}[method]
    if k < need:
        return np.zeros(k, dtype=bool)
    import cv2

    p0 = kp0[matches[:, 0]].astype(np.float64)
    p1 = kp1[matches[:, 1]].astype(np.float64)
    try:
        if method == "homography":
            model, mask = cv2.findHomography(
                p0, p1, cv2.USAC_MAGSAC, float(threshold), maxIters=2000, confidence=0.999
            )
        else:
            model, mask = cv2.findFundamentalMat(
                p0, p1, cv2.USAC_MAGSAC, float(threshold), 0.999, 2000
            )
    except cv2.error:
        return np.zeros(k, dtype=bool)
    if model is None or mask is None:
        return np.zeros(k, dtype=bool)
    return mask.ravel().astype(bool)


class ClassicalMatcher:
    """Mutual nearest neighbours + ratio test (descriptor space), no weights."""

    name = "classical"

    def __init__(self, ratio: float = 0.8) -> None:
        self.ratio = float(ratio)

    def match(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[MatchResult]:
        out = []
        for cand in candidates:
            matches, conf = mutual_ratio_matches(query.descriptors, cand.descriptors, self.ratio)
            out.append(MatchResult(matches, conf, np.ones(len(matches), dtype=bool)))
        return out


# -- LightGlue ----------------------------------------------------------------------------------


@contextlib.contextmanager
def preserved_torch_flags() -> Iterator[None]:
    """Restore the global cuDNN / SDPA flags that LightGlue implementations set on build."""
    import torch

    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.flash_sdp_enabled(),
    )
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.backends.cuda.enable_flash_sdp(saved[2])


def build_lightglue(
    features: str, filter_threshold: float = 0.1, adaptive: bool = True, device: str = "cpu"
):
    """kornia's LightGlue for ``disk``/``aliked`` features with the offline pretrained weights."""
    import torch
    from kornia.feature import LightGlue

    spec = feature_spec(features)
    if not spec.lightglue_weights or not spec.kornia_name:
        raise ModelError(f"no pretrained LightGlue weights for {features!r} features")
    conf = {k: v for k, v in LightGlue.features[spec.kornia_name].items() if k != "weights"}
    conf["filter_threshold"] = float(filter_threshold)
    if not adaptive:
        conf.update(depth_confidence=-1, width_confidence=-1)
    with preserved_torch_flags():
        model = LightGlue(features=None, **conf)
    state = load_state_dict(spec.lightglue_weights, device="cpu")
    n_layers = model.conf.n_layers
    renamed = {}
    for key, value in state.items():
        for i in range(n_layers):
            key = key.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.")
            key = key.replace(f"cross_attn.{i}.", f"transformers.{i}.cross_attn.")
        renamed[key] = value
    result = model.load_state_dict(renamed, strict=False)
    params = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in params]
    # ``log_assignment.<i>.r`` is an unused buffer of the original checkpoints.
    unexpected = [k for k in result.unexpected_keys if not k.endswith(".r")]
    if missing or unexpected:
        raise ModelError(
            f"LightGlue weights for {features} do not fit: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(torch.float32)


class LightGlueMatcher:
    """LightGlue over one query and many candidates, batching equal-sized candidates."""

    name = "lightglue"

    def __init__(
        self,
        features: str,
        filter_threshold: float = 0.1,
        adaptive: bool = True,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        self.model = build_lightglue(features, filter_threshold, adaptive, device)
        self.device = device
        self.batch_size = max(1, int(batch_size))

    def match(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[MatchResult]:
        import torch

        results: list[MatchResult | None] = [None] * len(candidates)
        groups: dict[int, list[int]] = {}
        for i, cand in enumerate(candidates):
            if len(query) == 0 or len(cand) == 0:
                results[i] = MatchResult.empty()
            else:
                groups.setdefault(len(cand), []).append(i)
        q_kp = torch.from_numpy(query.keypoints).to(self.device)
        q_desc = torch.from_numpy(query.descriptors).to(self.device)
        q_size = torch.tensor(query.image_size, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for idx in groups.values():
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start : start + self.batch_size]
                    b = len(chunk)
                    data = {
                        "image0": {
                            "keypoints": q_kp[None].expand(b, -1, -1),
                            "descriptors": q_desc[None].expand(b, -1, -1),
                            "image_size": q_size[None].expand(b, -1),
                        },
                        "image1": {
                            "keypoints": torch.from_numpy(
                                np.stack([candidates[i].keypoints for i in chunk])
                            ).to(self.device),
                            "descriptors": torch.from_numpy(
                                np.stack([candidates[i].descriptors for i in chunk])
                            ).to(self.device),
                            "image_size": torch.tensor(
                                [candidates[i].image_size for i in chunk],
                                dtype=torch.float32,
                                device=self.device,
                            ),
                        },
                    }
                    out = self.model(data)
                    for j, i in enumerate(chunk):
                        matches = out["matches"][j].cpu().numpy().astype(np.int64).reshape(-1, 2)
                        conf = out["scores"][j].float().cpu().numpy().astype(np.float32).reshape(-1)
                        results[i] = MatchResult(matches, conf, np.ones(len(matches), dtype=bool))
        return [r if r is not None else MatchResult.empty() for r in results]


# -- the pair scorer ----------------------------------------------------------------------------


class PairScorer:
    """Matcher + geometric verification + score, as ``RerankConfig`` describes them."""

    def __init__(self, cfg: RerankConfig, device: str = "cpu") -> None:
        self.cfg = cfg
        if cfg.matcher == "lightglue":
            self.matcher = LightGlueMatcher(
                cfg.extractor, cfg.filter_threshold, cfg.adaptive, device, cfg.batch_size
            )
        else:
            self.matcher = ClassicalMatcher(cfg.ratio)
        self.geometry = cfg.geometry_kind
        self.score_kind = cfg.score_kind

    def match(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[MatchResult]:
        results = self.matcher.match(query, candidates)
        if self.geometry != "none":
            for res, cand in zip(results, candidates, strict=True):
                res.inliers = verify_geometry(
                    query.keypoints,
                    cand.keypoints,
                    res.matches,
                    self.geometry,
                    self.cfg.ransac_threshold,
                )
        return results

    def score(
        self, query: LocalFeatures, candidates: Sequence[LocalFeatures]
    ) -> list[tuple[float, int]]:
        """``(score, surviving matches)`` per candidate."""
        return [(r.score(self.score_kind), r.num_inliers) for r in self.match(query, candidates)]
