"""Provisional ids for the night's new individuals, and the night's measured accuracy.

The known-vs-new decision itself is ``reid_ray.decide``; this module groups the images it
called new (the same new animal seen several times in one night gets one provisional id)
and, where a night's manifest carries true identities (tests, benchmarks), scores the
night. Pure numpy (FAISS through ``reid_ray.index``); no Ray.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from reid_ray.decide import KNOWN, NEW

logger = logging.getLogger(__name__)


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


__all__ = ["evaluate_decisions", "group_new"]
