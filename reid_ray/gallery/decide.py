"""Known-vs-new decision, its calibration on the gallery, and grouping of new individuals.

Pure numpy (FAISS through ``reid_ray.index``); no Ray. The nightly job has no labels, so
the decision is fitted on the gallery alone by ``reid_ray.evaluation.openset``, leaving
whole identities out: every sampled gallery image is a *known* query against the rest of
the gallery (its top-1 neighbour, right when that neighbour shares its identity) and an
*unknown* query against the gallery without its identity (its best score against another
identity). The threshold maximises balanced accuracy; a logistic fit of "same individual"
on the simulated top-1 scores turns scores into the probabilities reviewers see.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

NEW = "new"
KNOWN = "known"


def fit_calibration(
    ids: np.ndarray,
    identities: np.ndarray,
    matrix: np.ndarray,
    index,
    *,
    k: int = 50,
    max_queries: int = 5000,
    seed: int = 0,
    heldout_ids=None,
) -> dict[str, Any]:
    """The known-vs-new decision of a gallery: ``reid_ray.evaluation.openset`` fitted on the
    gallery's own leave-identity-out simulation (see the module docstring), plus a logistic
    fit of "same individual" on the simulated top-1 scores for the reviewers' confidence.
    ``heldout_ids``: gallery images the model never trained on (a checkpoint's held-out
    identities); they are searched first and, when enough, are the only simulated queries
    (``openset.choose_samples``)."""
    from sklearn.linear_model import LogisticRegression

    from reid_ray.evaluation.openset import (
        DecisionConfig,
        choose_samples,
        fit_decision,
        pairs_from_matrix,
    )
    from reid_ray.index import search
    from reid_ray.rerank.ranking import draw_preferred

    n = len(ids)
    if n < 3:
        raise ConfigError(f"a gallery needs at least 3 images to calibrate, got {n}")
    sample = np.arange(n)
    if n > max_queries:
        sample = draw_preferred(sample, max_queries, np.isin(ids, list(heldout_ids or ())), seed)
    scores, nbr = search(
        index, matrix[sample], min(k, n - 1), query_ids=ids[sample], exclude_self=True
    )
    cfg = DecisionConfig(seed=seed, max_samples=max(2, max_queries))
    samples = choose_samples(
        pairs_from_matrix(ids[sample], scores, nbr),
        ids.tolist(),
        dict(zip(ids.tolist(), identities.tolist(), strict=True)),
        heldout_ids=heldout_ids,
        cfg=cfg,
    )
    decision = fit_decision(samples, cfg)
    if not np.isfinite(decision.threshold):
        raise ConfigError(
            "cannot calibrate the known-vs-new decision: the gallery needs individuals with "
            f"at least two images and at least two individuals ({decision.message})"
        )
    right = samples.known_scores[samples.known_right]
    x = np.concatenate([right, samples.unknown_scores]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(right)), np.zeros(samples.n_unknown)])
    a, b = 1.0, -float(decision.threshold)
    if len(np.unique(y)) == 2:
        model = LogisticRegression(C=100.0, class_weight="balanced").fit(x, y)
        a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    return {
        **decision.to_dict(),
        "threshold": float(decision.threshold),
        "logistic": {"a": a, "b": b},
        "k": int(k),
        "max_queries": int(max_queries),
        "seed": int(seed),
    }


def probability(scores: np.ndarray, calibration: dict[str, Any]) -> np.ndarray:
    """P(same individual | score) from the calibration's logistic fit (nan stays nan)."""
    s = np.asarray(scores, dtype=np.float64)
    a, b = calibration["logistic"]["a"], calibration["logistic"]["b"]
    with np.errstate(over="ignore", invalid="ignore"):
        return 1.0 / (1.0 + np.exp(-(a * s + b)))


def decide(top_scores: np.ndarray, threshold: float) -> np.ndarray:
    """``known`` where the top-1 score reaches the threshold, else ``new``."""
    s = np.nan_to_num(np.asarray(top_scores, dtype=np.float64), nan=-np.inf)
    return np.where(s >= float(threshold), KNOWN, NEW).astype(object)


def group_new(ids, matrix: np.ndarray, threshold: float, mutual_k: int, night: str) -> list[str]:
    """Provisional ids for new images: connected components of the graph linking mutual
    neighbours (each in the other's ``mutual_k`` nearest) whose similarity >= threshold.

    Ids are ``new-<night>-<nnnn>``, numbered by each group's smallest image id, so the same
    images always get the same ids.
    """
    from reid_ray.index import build_index, search

    ids = [str(i) for i in ids]
    n = len(ids)
    if n == 0:
        return []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n > 1:
        index = build_index(matrix, ids, use_gpu=False)
        scores, nbr = search(index, matrix, min(mutual_k, n - 1), query_ids=ids, exclude_self=True)
        pos = {g: i for i, g in enumerate(ids)}
        near = [
            {
                pos[g]
                for g, s in zip(nbr[i], scores[i], strict=True)
                if g is not None and s >= threshold
            }
            for i in range(n)
        ]
        for i in range(n):
            for j in near[i]:
                if i in near[j]:
                    parent[find(i)] = find(j)
    roots = [find(i) for i in range(n)]
    first: dict[int, str] = {}
    for i in sorted(range(n), key=lambda i: ids[i]):
        first.setdefault(roots[i], ids[i])
    order = {root: c for c, root in enumerate(sorted(first, key=lambda r: first[r]), start=1)}
    return [f"new-{night}-{order[r]:04d}" for r in roots]


def evaluate_decisions(
    truth: list[str | None],
    gallery_identities: set[str],
    decisions,
    predicted,
    groups,
) -> dict[str, Any]:
    """Measured accuracy of one night where the manifest carries true identities (tests,
    benchmarks): the labels are read only here, never by the decision."""
    rows = [
        (t, d, p, g)
        for t, d, p, g in zip(truth, decisions, predicted, groups, strict=True)
        if t is not None and t == t
    ]
    if not rows:
        return {"n_labelled": 0}
    known = [(t, d, p) for t, d, p, _ in rows if t in gallery_identities]
    new = [(t, d, g) for t, d, _, g in rows if t not in gallery_identities]
    decision_right = sum((d == KNOWN) == (t in gallery_identities) for t, d, _, _ in rows)
    out: dict[str, Any] = {
        "n_labelled": len(rows),
        "n_truly_known": len(known),
        "n_truly_new": len(new),
        "decision_accuracy": decision_right / len(rows),
        "known_identified": (sum(d == KNOWN and p == t for t, d, p in known) / len(known))
        if known
        else None,
        "new_detected": (sum(d == NEW for _, d, _ in new) / len(new)) if new else None,
    }
    detected = [(t, g) for t, d, g in new if d == NEW and g]
    same_truth = same_group = both = 0
    for i in range(len(detected)):
        for j in range(i + 1, len(detected)):
            st, sg = detected[i][0] == detected[j][0], detected[i][1] == detected[j][1]
            same_truth += st
            same_group += sg
            both += st and sg
    out["new_grouping_pair_precision"] = both / same_group if same_group else None
    out["new_grouping_pair_recall"] = both / same_truth if same_truth else None
    out["measures"] = (
        "decision_accuracy: known-vs-new right, over labelled rows; known_identified: truly "
        "known rows decided known with the right identity; new_detected: truly new rows "
        "decided new; grouping pair precision/recall over pairs of detected new images"
    )
    return out
