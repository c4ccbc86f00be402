"""Calibrated fusion of the global cosine and the local score (WildFusion-style).

For a pair (query, candidate) with global cosine ``g`` and local score ``l``:

1. ``p_g = C_g(g)`` and ``p_l = C_l(l)``: each score calibrated on its own into a
   probability of "same individual" with scikit-learn (``IsotonicRegression``, or
   ``LogisticRegression`` on the standardised ``g`` and ``log1p(l)``), fitted on labelled
   gallery pairs;
2. the fused score ``s = (1 - w) p_g + w p_l`` (``s = p_g`` where the local score is
   missing: a failed image never hurts a pair);
3. the probability ``P(same) = C_s(s)``, a final monotone calibration of ``s``.

The weight ``w`` is chosen on held-out calibration queries (folds grouped by the query's
identity, so the calibrators never saw that individual): each held-out query ranks its
candidates, same and other identities, by ``s``, and the criterion is the mean average
precision over the queries that hold both kinds. Top-1 is not used: on a model trained on
the gallery it is 1.0 at every weight and has no signal. ``w = 0`` (the global order) is
kept unless another weight beats its mean AP by ``margin``; the stats say why.

A fitted model is plain numbers (``to_dict``/``from_dict``); there is no way to score with
an uncalibrated one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reid_ray.decide.calibration import Calibrator, fit_calibrator
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

FUSION_FORMAT = "reid-ray-fusion/1"
DEFAULT_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))


# -- the fusion model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionModel:
    """A fitted fusion: build it with ``fit_fusion`` or ``FusionModel.from_dict``."""

    global_cal: Calibrator
    local_cal: Calibrator
    final_cal: Calibrator
    weight: float
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("global_cal", "local_cal", "final_cal"):
            if not isinstance(getattr(self, name), Calibrator):
                raise ConfigError(
                    f"fusion model is not calibrated ({name} missing): fit it with fit_fusion"
                )
        if not 0.0 <= float(self.weight) <= 1.0:
            raise ConfigError(f"fusion weight must be in [0, 1], got {self.weight!r}")

    def fused_score(self, global_scores: np.ndarray, local_scores: np.ndarray) -> np.ndarray:
        """The ranking key ``s`` (see the module doc); NaN local scores use the global part."""
        g, loc = _as_scores(global_scores, local_scores)
        return _fuse(self.global_cal, self.local_cal, self.weight, g, loc)

    def predict_proba(self, global_scores: np.ndarray, local_scores: np.ndarray) -> np.ndarray:
        """Calibrated P(same individual) per pair, in [0, 1]."""
        s = self.fused_score(global_scores, local_scores)
        return np.clip(self.final_cal.predict(s), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FUSION_FORMAT,
            "weight": float(self.weight),
            "global": self.global_cal.to_dict(),
            "local": self.local_cal.to_dict(),
            "final": self.final_cal.to_dict(),
            "stats": _jsonable(self.stats),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionModel:
        if not isinstance(d, dict) or d.get("format") != FUSION_FORMAT:
            raise ConfigError(
                f"not a calibrated fusion model (expected format {FUSION_FORMAT!r}); "
                "fit one with reid-ray rerank --calibration or evaluate --rerank"
            )
        for key in ("global", "local", "final", "weight"):
            if key not in d:
                raise ConfigError(f"fusion model is not calibrated: {key!r} missing")
        return cls(
            Calibrator.from_dict(d["global"]),
            Calibrator.from_dict(d["local"]),
            Calibrator.from_dict(d["final"]),
            float(d["weight"]),  # a "threshold" of older files is ignored: decide fits it
            dict(d.get("stats", {})),
        )

    def save(self, path: str) -> None:
        from reid_ray import io as rio

        rio.write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> FusionModel:
        from reid_ray import io as rio

        try:
            return cls.from_dict(rio.read_json(path))
        except FileNotFoundError:
            raise ConfigError(f"fusion model not found: {path}") from None


def _fuse(cg: Calibrator, cl: Calibrator, w: float, g: np.ndarray, loc: np.ndarray) -> np.ndarray:
    p_g = cg.predict(g)
    has_local = np.isfinite(loc)
    p_l = np.where(has_local, cl.predict(np.where(has_local, loc, 0.0)), p_g)
    return (1.0 - w) * p_g + w * p_l


def _as_scores(global_scores, local_scores) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(global_scores, dtype=np.float64).ravel()
    loc = np.asarray(
        [np.nan if v is None else v for v in local_scores]
        if isinstance(local_scores, list)
        else local_scores,
        dtype=np.float64,
    ).ravel()
    if g.shape != loc.shape:
        raise ConfigError(f"global and local scores differ in length: {g.size} vs {loc.size}")
    if not np.all(np.isfinite(g)):
        raise ConfigError("global scores must be finite numbers")
    return g, loc


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# -- ranking quality ----------------------------------------------------------------------------


def order_within_queries(
    query_index: np.ndarray, primary: np.ndarray, secondary: np.ndarray
) -> np.ndarray:
    """Row order: by query, then ``primary`` descending, then ``secondary`` descending."""
    return np.lexsort((-np.asarray(secondary), -np.asarray(primary), np.asarray(query_index)))


def per_query_metrics(
    query_index: np.ndarray, primary: np.ndarray, secondary: np.ndarray, positive: np.ndarray
) -> dict[str, np.ndarray]:
    """Per query (sorted ids): ``ap`` (average precision of the order by ``primary`` then
    ``secondary``), ``top1``, ``rr`` (reciprocal rank of the first positive), ``positives``
    and ``negatives``. Queries without a positive get NaN ``ap``/``top1``/``rr``."""
    q = np.asarray(query_index)
    order = order_within_queries(q, primary, secondary)
    qs, pos = q[order], np.asarray(positive, dtype=bool)[order]
    if qs.size == 0:
        empty = np.zeros(0)
        return {"ap": empty, "top1": empty, "rr": empty, "positives": empty, "negatives": empty}
    starts = np.r_[0, np.nonzero(qs[1:] != qs[:-1])[0] + 1]
    counts = np.diff(np.r_[starts, qs.size])
    rank = np.arange(qs.size) - np.repeat(starts, counts)
    cum = np.cumsum(pos)
    before = np.repeat(np.r_[0, cum[starts[1:] - 1]], counts)
    hits = cum - before  # positives up to and including this row, within its query
    n_pos = np.add.reduceat(pos.astype(np.int64), starts)
    prec_sum = np.add.reduceat(np.where(pos, hits / (rank + 1.0), 0.0), starts)
    first = np.where(pos, rank, np.iinfo(np.int64).max)
    first = np.minimum.reduceat(first, starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(n_pos > 0, prec_sum / np.maximum(n_pos, 1), np.nan)
        rr = np.where(n_pos > 0, 1.0 / (first + 1.0), np.nan)
    top1 = np.where(n_pos > 0, (first == 0).astype(np.float64), np.nan)
    return {"ap": ap, "top1": top1, "rr": rr, "positives": n_pos, "negatives": counts - n_pos}


def ranking_quality(
    query_index: np.ndarray, primary: np.ndarray, secondary: np.ndarray, positive: np.ndarray
) -> tuple[float, float]:
    """``(top-1, mean reciprocal rank)`` over queries that have a positive candidate."""
    m = per_query_metrics(query_index, primary, secondary, positive)
    ok = m["positives"] > 0
    if not ok.any():
        return 0.0, 0.0
    return float(np.mean(m["top1"][ok])), float(np.mean(m["rr"][ok]))


# -- fitting ------------------------------------------------------------------------------------


def fit_fusion(
    global_scores: np.ndarray,
    local_scores: np.ndarray,
    same_identity: np.ndarray,
    query_ids: np.ndarray | None = None,
    *,
    groups: np.ndarray | None = None,
    method: str = "isotonic",
    weights: tuple[float, ...] = DEFAULT_WEIGHTS,
    folds: int = 5,
    margin: float = 0.01,
    min_negatives: int = 0,
    seed: int = 0,
) -> FusionModel:
    """Fit the fusion on labelled pairs (see the module doc).

    ``local_scores`` may hold NaN (pairs without a local score). ``query_ids`` group the
    pairs into rankings; ``groups`` (default: the query ids) keep a group's queries in one
    fold: pass the query's identity. Without ``query_ids`` the weight cannot be judged and
    is 0 unless ``weights`` holds one value. Raises ``ConfigError`` without both same and
    different pairs, or with fewer than ``min_negatives`` different pairs.
    """
    g, loc = _as_scores(global_scores, local_scores)
    y = np.asarray(same_identity).astype(bool).ravel()
    if y.shape != g.shape:
        raise ConfigError(f"same_identity has {y.size} labels for {g.size} pairs")
    n_neg = int((~y).sum())
    if y.all() or not y.any():
        raise ConfigError(
            f"calibration needs labelled pairs of both kinds: {int(y.sum())} same-individual and "
            f"{n_neg} different-individual pairs given"
        )
    if n_neg < min_negatives:
        raise ConfigError(
            f"calibration would be fitted on {n_neg} different-individual pairs, fewer than "
            f"min_negatives={min_negatives}: give more labelled gallery candidates (more "
            "queries or calibration_negatives), or lower min_negatives knowingly"
        )
    has_local = np.isfinite(loc)
    weights = tuple(sorted({float(w) for w in weights}))
    stats: dict[str, Any] = {
        "pairs": int(g.size),
        "same_pairs": int(y.sum()),
        "different_pairs": n_neg,
        "pairs_with_local": int(has_local.sum()),
        "method": method,
    }

    def fit_parts(idx: np.ndarray) -> tuple[Calibrator, Calibrator]:
        cg = fit_calibrator(g[idx], y[idx], method)
        li = idx[has_local[idx]]
        if len(li) == 0 or y[li].all() or not y[li].any():
            cl = Calibrator("logistic", "log1p", a=0.0, b=0.0)  # no information: 0.5
        else:
            cl = fit_calibrator(loc[li], y[li], method, transform="log1p")
        return cg, cl

    oof = None
    if len(weights) == 1:
        weight, reason = weights[0], "fixed by the caller"
    elif not has_local.any() or y[has_local].all() or not y[has_local].any():
        weight, reason = 0.0, "no local scores of both kinds among the calibration pairs"
    elif query_ids is None:
        weight, reason = 0.0, "no query ids to judge a ranking by: the global order"
    else:
        weight, reason, oof = _choose_weight(
            g, loc, y, query_ids, groups, weights, folds, margin, seed, fit_parts, stats
        )
    cg, cl = fit_parts(np.arange(g.size))
    if oof is not None:
        s_fit = oof[weights.index(weight)]
    else:
        s_fit = _fuse(cg, cl, weight, g, loc)
    final = fit_calibrator(s_fit, y, method)
    stats.update(weight=float(weight), weight_reason=reason)
    logger.info(
        "fusion fitted on %d pairs (%d same, %d different): local weight %.2f (%s)",
        g.size,
        int(y.sum()),
        n_neg,
        weight,
        reason,
    )
    return FusionModel(cg, cl, final, float(weight), stats)


def _choose_weight(g, loc, y, query_ids, groups, weights, folds, margin, seed, fit_parts, stats):
    """Held-out mean AP per weight (folds grouped by ``groups``); returns the weight, why,
    and the out-of-fold fused scores (weights x pairs)."""
    q = np.asarray(query_ids).astype(str).ravel()
    if q.shape != g.shape:
        raise ConfigError(f"query_ids has {q.size} entries for {g.size} pairs")
    grp = q if groups is None else np.asarray(groups).astype(str).ravel()
    if grp.shape != g.shape:
        raise ConfigError(f"groups has {grp.size} entries for {g.size} pairs")
    _, qidx = np.unique(q, return_inverse=True)
    ugrp, gidx = np.unique(grp, return_inverse=True)
    n_folds = max(2, min(int(folds), len(ugrp)))
    fold = (np.random.default_rng(seed).permutation(len(ugrp)) % n_folds)[gidx]
    oof = np.full((len(weights), g.size), np.nan)
    for f in range(n_folds):
        train, test = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        if test.size == 0:
            continue
        if y[train].all() or not y[train].any():
            train = np.arange(g.size)  # too few labels to hold out: fit on all
        cg, cl = fit_parts(train)
        for k, w in enumerate(weights):
            oof[k, test] = _fuse(cg, cl, w, g[test], loc[test])
    table = {}
    usable = None
    for k, w in enumerate(weights):
        m = per_query_metrics(qidx, oof[k], g, y)
        usable = (m["positives"] > 0) & (m["negatives"] > 0)
        table[w] = {
            "map": float(np.mean(m["ap"][usable])) if usable.any() else None,
            "top1": float(np.mean(m["top1"][usable])) if usable.any() else None,
        }
    n_usable = int(usable.sum()) if usable is not None else 0
    stats["cv"] = {f"{w:g}": v for w, v in table.items()}
    stats["cv_queries"] = n_usable
    stats["cv_folds"] = n_folds
    stats["cv_criterion"] = "mean average precision of held-out queries (same and other ids)"
    if n_usable == 0:
        return 0.0, "no held-out query has candidates of both kinds: no signal", oof
    base = table[weights[0]]["map"] if weights[0] == 0.0 else None
    best = max(weights, key=lambda w: (round(table[w]["map"], 9), -w))
    if base is None:
        return best, f"best held-out mAP {table[best]['map']:.4f} (no global-only weight)", oof
    gain = table[best]["map"] - base
    if best == 0.0 or gain <= margin:
        return (
            0.0,
            f"no weight beats the global score's held-out mAP {base:.4f} by more than "
            f"{margin:g} (best {best:g}: {table[best]['map']:.4f}): global order kept",
            oof,
        )
    return (
        best,
        f"held-out mAP {table[best]['map']:.4f} at weight {best:g} vs {base:.4f} global only "
        f"over {n_usable} queries",
        oof,
    )
