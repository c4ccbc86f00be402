"""The known-vs-new rule: accept the top candidate's identity when its score reaches the
threshold, else "new"; and the one-pass curve of balanced accuracies a threshold is
chosen on.

BAKS/BAUS are balanced per identity, as wildlife-datasets defines them
(``reid_ray.evaluation.metrics.open_set_metrics`` scores real queries with them). Pure
numpy; no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from reid_ray.errors import ConfigError

NEW = "new"
KNOWN = "known"


def as_1d(x: Any, name: str) -> np.ndarray:
    """``x`` as a one-dimensional array (object dtype unless it already is an array)."""
    arr = np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def as_float_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def predict_with_threshold(
    top_scores: Sequence[float] | np.ndarray,
    top_identities: Sequence[Any] | np.ndarray,
    threshold: float,
    new_label: Any = NEW,
) -> np.ndarray:
    """Open-set decision: the top candidate's identity when its score >= ``threshold``,
    else ``new_label``. A nan score or a ``None``/nan identity (no candidate) gives
    ``new_label``.

    Returns an object array [Q].
    """
    if threshold is None or not math.isfinite(float(threshold)):
        raise ConfigError(
            f"threshold must be a finite number, got {threshold!r} (a threshold selected on a "
            "gallery with no individual seen twice is nan)"
        )
    scores = as_float_1d(top_scores, "top_scores")
    identities = as_1d(top_identities, "top_identities")
    if scores.shape != identities.shape:
        raise ConfigError(
            f"top_scores and top_identities differ in length: {len(scores)} vs {len(identities)}"
        )
    out = np.empty(len(scores), dtype=object)
    accept = np.nan_to_num(scores, nan=-np.inf) >= float(threshold)
    for i, (ok, identity) in enumerate(zip(accept, identities, strict=True)):
        missing = identity is None or (isinstance(identity, float) and math.isnan(identity))
        out[i] = identity if ok and not missing else new_label
    return out


def known_or_new(top_scores, threshold: float) -> np.ndarray:
    """``known`` where the top-1 score reaches the threshold, else ``new`` (nan: new)."""
    s = np.nan_to_num(np.asarray(top_scores, dtype=np.float64), nan=-np.inf)
    return np.where(s >= float(threshold), KNOWN, NEW).astype(object)


def _balanced_weights(groups: np.ndarray) -> np.ndarray:
    """Per-sample weights summing to 1 that give every group (identity) the same total."""
    if len(groups) == 0:
        return np.zeros(0, dtype=np.float64)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / (len(counts) * counts[inverse].astype(np.float64))


def balanced_threshold_curve(
    known_scores: np.ndarray,
    known_right: np.ndarray,
    known_groups: np.ndarray,
    unknown_scores: np.ndarray,
    unknown_groups: np.ndarray,
) -> dict[str, np.ndarray]:
    """Open-set accuracies of every distinct threshold, in one pass (sort + cumulative sums).

    A sample is accepted as known when its score >= the threshold
    (:func:`predict_with_threshold`). Known samples are right when accepted with the right
    top-1 identity; unknown samples when rejected. Rates are balanced per group (identity),
    as BAKS/BAUS are. Returns arrays over the candidate cuts: ``cut`` (the distinct scores,
    then ``inf`` which accepts nothing), ``values`` (the distinct scores), ``baks``,
    ``baus``, ``false_new`` (balanced share of known samples rejected) and ``false_known``
    (share of unknown samples accepted, ``1 - baus``).
    """
    ks = np.asarray(known_scores, dtype=np.float64)
    kr = np.asarray(known_right, dtype=bool)
    us = np.asarray(unknown_scores, dtype=np.float64)
    kw = _balanced_weights(np.asarray(known_groups).astype(str))
    uw = _balanced_weights(np.asarray(unknown_groups).astype(str))
    values = np.unique(np.concatenate([ks, us]))
    cut = np.concatenate([values, [np.inf]])

    def below(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Total weight of the samples scoring below each cut."""
        order = np.argsort(scores, kind="stable")
        cum = np.concatenate([[0.0], np.cumsum(weights[order])])
        return cum[np.searchsorted(scores[order], cut, side="left")]

    # clipped: cumulative sums of many small weights drift by ~1e-12
    right_w = np.where(kr, kw, 0.0)
    baks = np.clip(right_w.sum() - below(ks, right_w), 0.0, 1.0)
    false_new = np.clip(below(ks, kw), 0.0, 1.0)
    baus = np.clip(below(us, uw), 0.0, 1.0)
    return {
        "cut": cut, "values": values, "baks": baks, "baus": baus,
        "false_new": false_new, "false_known": 1.0 - baus,
    }  # fmt: skip


def best_balanced_index(curve: dict[str, np.ndarray]) -> int:
    """The cut maximising (BAKS + BAUS) / 2; ties: the middle best cut (the lower of two),
    so the threshold sits in the gap between separated groups."""
    objective = (curve["baks"] + curve["baus"]) / 2.0
    best = np.flatnonzero(objective >= objective.max() - 1e-9)
    return int(best[(len(best) - 1) // 2])


def threshold_at(curve: dict[str, np.ndarray], j: int) -> float:
    """A threshold that accepts exactly what cut ``j`` accepts: the midpoint between the two
    scores that bound it (the lowest score for cut 0, just above the highest for the last)."""
    values = curve["values"]
    if j == 0:
        return float(values[0])
    if j == len(values):
        return float(np.nextafter(values[-1], np.inf))
    return float((values[j - 1] + values[j]) / 2.0)


__all__ = [
    "KNOWN",
    "NEW",
    "as_1d",
    "as_float_1d",
    "balanced_threshold_curve",
    "best_balanced_index",
    "known_or_new",
    "predict_with_threshold",
    "threshold_at",
]
