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


def new_neighbours(ids, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each new image's ``k`` nearest other new images: ([N, K] cosines, [N, K] ids with
    ``None`` pads), by FAISS over the night's new images only."""
    from reid_ray.index import build_index, search

    ids = [str(i) for i in ids]
    if len(ids) < 2:
        return np.zeros((len(ids), 0), np.float32), np.zeros((len(ids), 0), object)
    index = build_index(matrix, ids, use_gpu=False)
    return search(index, matrix, min(k, len(ids) - 1), query_ids=ids, exclude_self=True)


def provisional_ids(ids, linked, night: str) -> list[str]:
    """Provisional ids: connected components (scipy) of the ``linked`` pairs of image ids.

    Ids are ``new-<night>-<nnnn>``, numbered by each group's smallest image id, so the same
    images always get the same ids.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ids = [str(i) for i in ids]
    n = len(ids)
    if n == 0:
        return []
    pos = {g: i for i, g in enumerate(ids)}
    edges = [(pos[a], pos[b]) for a, b in linked if a in pos and b in pos]
    rows = np.array([a for a, _ in edges], dtype=np.int64)
    cols = np.array([b for _, b in edges], dtype=np.int64)
    graph = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first: dict[int, str] = {}
    for i in sorted(range(n), key=lambda i: ids[i]):
        first.setdefault(int(labels[i]), ids[i])
    order = {c: k for k, c in enumerate(sorted(first, key=lambda c: first[c]), start=1)}
    return [f"new-{night}-{order[int(c)]:04d}" for c in labels]


def group_new(ids, matrix: np.ndarray, threshold: float, mutual_k: int, night: str) -> list[str]:
    """Provisional ids for new images by the global score: components of the graph linking
    mutual neighbours (each in the other's ``mutual_k`` nearest) whose cosine >= threshold."""
    ids = [str(i) for i in ids]
    scores, nbr = new_neighbours(ids, matrix, mutual_k)
    near = [
        {g for g, s in zip(nbr[i], scores[i], strict=True) if g is not None and s >= threshold}
        for i in range(len(ids))
    ]
    at = {g: i for i, g in enumerate(ids)}
    linked = [(a, b) for i, a in enumerate(ids) for b in near[i] if a in near[at[b]]]
    return provisional_ids(ids, linked, night)


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


__all__ = ["evaluate_decisions", "group_new", "new_neighbours", "provisional_ids"]
