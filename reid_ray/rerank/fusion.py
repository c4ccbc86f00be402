"""Calibrated fusion of the global cosine and the local score (WildFusion-style).

What it computes, for a pair (query, candidate) with global cosine ``g`` and local score
``l``:

1. ``p_g = C_g(g)`` and ``p_l = C_l(l)``: each score calibrated on its own into a
   probability of "same individual" (isotonic regression, or a logistic fit on ``g`` and
   ``log1p(l)``), fitted on labelled gallery pairs;
2. the fused score ``s = (1 - w) p_g + w p_l`` (``s = p_g`` where the local score is
   missing: a failed image never hurts a pair);
3. the probability ``P(same) = C_s(s)``, a final monotone calibration of ``s``.

The weight ``w`` is chosen on the labelled pairs by grouped cross-validation over their
queries: the ``w`` with the best held-out top-1 (mean reciprocal rank breaks ties, then the
smaller ``w``). ``w = 0`` ranks exactly as the global model does, so a local score that
does not help on the labelled pairs is not used, and fusion does not make a strong global
model worse on them. Ranking is by ``s`` then ``g``; ``P(same)`` is monotone in ``s``, so
the order is the order of the calibrated probability (its ties broken by ``s``).

A query whose top candidate has ``P(same) < threshold`` (default 0.5, where "same" becomes
the likelier answer) is a new individual. The model is plain numbers: ``to_dict`` /
``from_dict`` store it with the results, and there is no way to score with an uncalibrated
one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

FUSION_FORMAT = "reid-ray-fusion/1"
DEFAULT_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))


# -- one-dimensional calibrators ----------------------------------------------------------------


@dataclass(frozen=True)
class Calibrator:
    """A monotone map from a score to a probability: ``isotonic`` (piecewise linear through
    the fitted points, clipped at the ends) or ``logistic`` (``sigmoid(a * x + b)``), after
    an optional ``log1p`` of the score."""

    kind: str
    transform: str = "identity"
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    a: float = 0.0
    b: float = 0.0

    def _t(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        if self.transform == "log1p":
            return np.log1p(np.maximum(v, 0.0))
        return v

    def predict(self, values: np.ndarray) -> np.ndarray:
        v = self._t(values)
        if self.kind == "isotonic":
            return np.interp(v, np.asarray(self.x), np.asarray(self.y))
        z = np.clip(self.a * v + self.b, -50.0, 50.0)
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "transform": self.transform,
            "x": list(self.x),
            "y": list(self.y),
            "a": self.a,
            "b": self.b,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        try:
            cal = cls(
                str(d["kind"]),
                str(d.get("transform", "identity")),
                tuple(float(v) for v in d.get("x", ())),
                tuple(float(v) for v in d.get("y", ())),
                float(d.get("a", 0.0)),
                float(d.get("b", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad calibrator in fusion model: {exc}") from None
        if cal.kind not in ("isotonic", "logistic") or cal.transform not in ("identity", "log1p"):
            raise ConfigError(
                f"bad calibrator in fusion model: kind {cal.kind!r}, transform {cal.transform!r}"
            )
        if cal.kind == "isotonic" and (len(cal.x) == 0 or len(cal.x) != len(cal.y)):
            raise ConfigError("bad isotonic calibrator in fusion model: no fitted points")
        return cal


def fit_calibrator(
    values: np.ndarray, labels: np.ndarray, kind: str, transform: str = "identity"
) -> Calibrator:
    """Fit a monotone (non-decreasing for isotonic) calibrator of ``values`` to ``labels``."""
    proto = Calibrator(kind, transform)
    x = proto._t(values)
    y = np.asarray(labels, dtype=np.float64)
    if kind == "isotonic":
        xs, ys = isotonic_fit(x, y)
        return Calibrator(kind, transform, tuple(xs), tuple(ys))
    if kind == "logistic":
        a, b = logistic_fit(x, y)
        return Calibrator(kind, transform, a=a, b=b)
    raise ConfigError(f"calibration must be 'isotonic' or 'logistic', got {kind!r}")


def isotonic_fit(x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators).

    Returns the knots ``(xs, ys)`` of the fitted step function: the first and last ``x`` of
    every block, for linear interpolation between blocks (as scikit-learn's
    ``IsotonicRegression`` predicts); ties in ``x`` are averaged first.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0:
        raise ConfigError("cannot calibrate on zero pairs")
    ux, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    means = np.bincount(inv, weights=y) / cnt
    vals: list[float] = []
    wts: list[float] = []
    starts: list[int] = []
    for i in range(len(ux)):
        v, w, s = float(means[i]), float(cnt[i]), i
        while vals and vals[-1] >= v:
            pv, pw, ps = vals.pop(), wts.pop(), starts.pop()
            v, w, s = (pv * pw + v * w) / (pw + w), pw + w, ps
        vals.append(v)
        wts.append(w)
        starts.append(s)
    xs: list[float] = []
    ys: list[float] = []
    for j, s in enumerate(starts):
        e = starts[j + 1] - 1 if j + 1 < len(starts) else len(ux) - 1
        xs.append(float(ux[s]))
        ys.append(float(np.clip(vals[j], 0.0, 1.0)))
        if e != s:
            xs.append(float(ux[e]))
            ys.append(float(np.clip(vals[j], 0.0, 1.0)))
    return xs, ys


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> tuple[float, float]:
    """``(a, b)`` of ``P(y=1) = sigmoid(a x + b)`` by Newton's method, a small L2 penalty on
    the slope (of the standardised ``x``) keeping separable data finite."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    rate = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    mu, sd = float(x.mean()), float(x.std())
    if sd == 0:
        return 0.0, float(np.log(rate / (1 - rate)))
    z = (x - mu) / sd
    a, b = 0.0, float(np.log(rate / (1 - rate)))
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(a * z + b, -50, 50)))
        w = p * (1 - p)
        grad = np.array([np.sum((p - y) * z) + l2 * a, np.sum(p - y)])
        hess = np.array(
            [[np.sum(w * z * z) + l2, np.sum(w * z)], [np.sum(w * z), np.sum(w) + 1e-9]]
        )
        step = np.linalg.solve(hess, grad)
        a, b = a - float(step[0]), b - float(step[1])
        if np.max(np.abs(step)) < 1e-10:
            break
    return a / sd, b - a * mu / sd


# -- the fusion model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionModel:
    """A fitted fusion: build it with ``fit_fusion`` or ``FusionModel.from_dict``."""

    global_cal: Calibrator
    local_cal: Calibrator
    final_cal: Calibrator
    weight: float
    threshold: float = 0.5
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("global_cal", "local_cal", "final_cal"):
            if not isinstance(getattr(self, name), Calibrator):
                raise ConfigError(
                    f"fusion model is not calibrated ({name} missing): fit it with fit_fusion"
                )
        if not 0.0 <= float(self.weight) <= 1.0:
            raise ConfigError(f"fusion weight must be in [0, 1], got {self.weight!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"fusion threshold must be in [0, 1], got {self.threshold!r}")

    def fused_score(self, global_scores: np.ndarray, local_scores: np.ndarray) -> np.ndarray:
        """The ranking key ``s`` (see the module doc); NaN local scores use the global part."""
        g, loc = _as_scores(global_scores, local_scores)
        p_g = self.global_cal.predict(g)
        has_local = np.isfinite(loc)
        p_l = np.where(has_local, self.local_cal.predict(np.where(has_local, loc, 0.0)), p_g)
        return (1.0 - self.weight) * p_g + self.weight * p_l

    def predict_proba(self, global_scores: np.ndarray, local_scores: np.ndarray) -> np.ndarray:
        """Calibrated P(same individual) per pair, in [0, 1]."""
        return np.clip(
            self.final_cal.predict(self.fused_score(global_scores, local_scores)), 0.0, 1.0
        )

    def is_new(self, top_probability: np.ndarray) -> np.ndarray:
        """Known-vs-new decision on each query's top calibrated probability."""
        return np.asarray(top_probability, dtype=np.float64) < self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FUSION_FORMAT,
            "weight": float(self.weight),
            "threshold": float(self.threshold),
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
                "fit one with fit_fusion / reid-ray evaluate --rerank"
            )
        for key in ("global", "local", "final", "weight"):
            if key not in d:
                raise ConfigError(f"fusion model is not calibrated: {key!r} missing")
        return cls(
            Calibrator.from_dict(d["global"]),
            Calibrator.from_dict(d["local"]),
            Calibrator.from_dict(d["final"]),
            float(d["weight"]),
            float(d.get("threshold", 0.5)),
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


# -- ranking helpers ----------------------------------------------------------------------------


def order_within_queries(
    query_index: np.ndarray, primary: np.ndarray, secondary: np.ndarray
) -> np.ndarray:
    """Row order: by query, then ``primary`` descending, then ``secondary`` descending."""
    return np.lexsort((-np.asarray(secondary), -np.asarray(primary), np.asarray(query_index)))


def ranking_quality(
    query_index: np.ndarray, primary: np.ndarray, secondary: np.ndarray, positive: np.ndarray
) -> tuple[float, float]:
    """``(top-1, mean reciprocal rank)`` over queries that have a positive candidate."""
    q = np.asarray(query_index)
    order = order_within_queries(q, primary, secondary)
    qs, pos = q[order], np.asarray(positive, dtype=bool)[order]
    starts = np.r_[0, np.nonzero(qs[1:] != qs[:-1])[0] + 1]
    rank_in_q = np.arange(len(qs)) - np.repeat(starts, np.diff(np.r_[starts, len(qs)]))
    top1, rr = [], []
    for s, e in zip(starts, np.r_[starts[1:], len(qs)], strict=True):
        hits = np.nonzero(pos[s:e])[0]
        if len(hits) == 0:
            continue
        top1.append(float(hits[0] == 0))
        rr.append(1.0 / (1 + rank_in_q[s + hits[0]]))
    if not top1:
        return 0.0, 0.0
    return float(np.mean(top1)), float(np.mean(rr))


# -- fitting ------------------------------------------------------------------------------------


def fit_fusion(
    global_scores: np.ndarray,
    local_scores: np.ndarray,
    same_identity: np.ndarray,
    query_ids: np.ndarray | None = None,
    *,
    method: str = "isotonic",
    weights: tuple[float, ...] = DEFAULT_WEIGHTS,
    folds: int = 5,
    threshold: float | None = None,
    seed: int = 0,
) -> FusionModel:
    """Fit the fusion on labelled pairs (see the module doc).

    ``local_scores`` may hold NaN (pairs without a local score). Without ``query_ids`` the
    weight cannot be chosen by ranking quality and is 0.5 (WildFusion's plain average).
    Raises ``ConfigError`` without both same and different pairs.
    """
    g, loc = _as_scores(global_scores, local_scores)
    y = np.asarray(same_identity).astype(bool).ravel()
    if y.shape != g.shape:
        raise ConfigError(f"same_identity has {y.size} labels for {g.size} pairs")
    if y.all() or not y.any():
        raise ConfigError(
            f"calibration needs labelled pairs of both kinds: {int(y.sum())} same-individual and "
            f"{int((~y).sum())} different-individual pairs given"
        )
    has_local = np.isfinite(loc)
    if has_local.sum() == 0 or y[has_local].all() or not y[has_local].any():
        logger.warning("no usable local scores among the calibration pairs: fusing with weight 0")
        weights = (0.0,)

    def fit_parts(idx: np.ndarray) -> tuple[Calibrator, Calibrator]:
        cg = fit_calibrator(g[idx], y[idx], method)
        li = idx[has_local[idx]]
        if len(li) == 0 or y[li].all() or not y[li].any():
            cl = Calibrator("logistic", "log1p", a=0.0, b=0.0)  # no information: 0.5
        else:
            cl = fit_calibrator(loc[li], y[li], method, transform="log1p")
        return cg, cl

    def fused(cg: Calibrator, cl: Calibrator, w: float, idx: np.ndarray) -> np.ndarray:
        p_g = cg.predict(g[idx])
        hl = has_local[idx]
        p_l = np.where(hl, cl.predict(np.where(hl, loc[idx], 0.0)), p_g)
        return (1.0 - w) * p_g + w * p_l

    stats: dict[str, Any] = {
        "pairs": int(g.size),
        "same_pairs": int(y.sum()),
        "pairs_with_local": int(has_local.sum()),
        "method": method,
    }
    weights = tuple(sorted({float(w) for w in weights}))
    oof = None
    if query_ids is not None and len(weights) > 1:
        q = np.asarray(query_ids).astype(str).ravel()
        if q.shape != g.shape:
            raise ConfigError(f"query_ids has {q.size} entries for {g.size} pairs")
        uq, qidx = np.unique(q, return_inverse=True)
        rng = np.random.default_rng(seed)
        fold_of_query = rng.permutation(len(uq)) % max(2, min(int(folds), len(uq)))
        fold = fold_of_query[qidx]
        oof = np.full((len(weights), g.size), np.nan)
        for f in np.unique(fold):
            train, test = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
            if y[train].all() or not y[train].any():
                train = np.arange(g.size)  # too few labels to hold out: fit on all
            cg, cl = fit_parts(train)
            for k, w in enumerate(weights):
                oof[k, test] = fused(cg, cl, w, test)
        table = {}
        for k, w in enumerate(weights):
            table[w] = ranking_quality(qidx, oof[k], g, y)
        best = max(weights, key=lambda w: (round(table[w][0], 9), round(table[w][1], 9), -w))
        stats["cv"] = {f"{w:g}": {"top1": t1, "mrr": mrr} for w, (t1, mrr) in table.items()}
        stats["cv_top1_global"] = table[weights[0]][0] if weights[0] == 0.0 else None
        stats["cv_top1_fused"] = table[best][0]
        stats["queries"] = int(len(uq))
        weight = best
    else:
        weight = weights[0] if len(weights) == 1 else 0.5
    cg, cl = fit_parts(np.arange(g.size))
    if oof is not None:
        s_fit = oof[weights.index(weight)]
    else:
        s_fit = fused(cg, cl, weight, np.arange(g.size))
    final = fit_calibrator(s_fit, y, method)
    stats["weight"] = float(weight)
    model = FusionModel(
        cg, cl, final, float(weight), 0.5 if threshold is None else float(threshold), stats
    )
    logger.info(
        "fusion fitted on %d pairs (%d same): weight of the local score %.2f",
        g.size,
        int(y.sum()),
        weight,
    )
    return model
