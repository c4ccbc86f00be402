"""Evaluation metrics: retrieval (mAP, CMC top-k), open-set (BAKS, BAUS), clustering.

Pure numpy (sklearn for NMI/ARI, imported on use). Identities are compared with ``==``
after conversion to numpy object arrays, so strings and integers both work; ``None`` in a
ranked list (padding) never matches.

Empty inputs return early: metric values are ``nan`` and the counts are 0, never an error,
so a job on an empty split still writes its ``metrics.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from reid_ray.decide.rule import as_1d
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

NAN = float("nan")


def _ragged_matches(query_identities: np.ndarray, ranked: Any) -> np.ndarray:
    """Bool matrix [Q, K] of ranked[q][r] == query_identities[q]; short rows padded False."""
    if isinstance(ranked, np.ndarray) and ranked.ndim == 2:
        if ranked.shape[0] != len(query_identities):
            raise ConfigError(
                f"ranked_gallery_identities has {ranked.shape[0]} rows for "
                f"{len(query_identities)} queries"
            )
        return np.asarray(ranked == query_identities[:, None], dtype=bool)
    rows = list(ranked)
    if len(rows) != len(query_identities):
        raise ConfigError(
            f"ranked_gallery_identities has {len(rows)} rows for {len(query_identities)} queries"
        )
    width = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), width), dtype=bool)
    for q, row in enumerate(rows):
        target = query_identities[q]
        for r, identity in enumerate(row):
            out[q, r] = identity is not None and identity == target
    return out


def retrieval_metrics(
    query_identities: Sequence[Any] | np.ndarray,
    ranked_gallery_identities: Sequence[Sequence[Any]] | np.ndarray,
    n_relevant: Sequence[int] | np.ndarray,
    ks: Sequence[int] = (1, 5, 20),
) -> dict[str, float | int]:
    """CMC top-k and mAP from ranked candidate lists.

    Args:
        query_identities: [Q] the true identity of each query.
        ranked_gallery_identities: [Q, K] (array, or a list of lists of any lengths) the
            identities of each query's gallery candidates, best first; ``None`` pads.
        n_relevant: [Q] how many gallery items share the query's identity (all of them,
            not only those in the list).
        ks: the cut-offs of the CMC curve.

    Returns ``{"top1": ..., "top5": ..., "top20": ..., "mAP": ..., "n_queries": n}``:
    ``topk`` is the fraction of queries whose first correct candidate is within the first
    k; AP is the sum of precision@r over the ranks r of the correct candidates divided by
    ``n_relevant[q]``, so relevant items missing from a truncated list count as misses.
    Queries with ``n_relevant == 0`` (an individual absent from the gallery) are excluded:
    they are scored by :func:`open_set_metrics`. With no query left, the metrics are nan.
    """
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ConfigError(f"ks must be positive, got {ks}")
    queries = as_1d(query_identities, "query_identities")
    n_rel = np.asarray(n_relevant)
    if n_rel.shape != (len(queries),):
        raise ConfigError(f"n_relevant must have shape ({len(queries)},), got {n_rel.shape}")
    if len(queries) and (n_rel < 0).any():
        raise ConfigError("n_relevant must be >= 0")
    matches = _ragged_matches(queries, ranked_gallery_identities)
    hits = matches.sum(axis=1)
    if (hits > n_rel).any():
        q = int(np.argmax(hits > n_rel))
        raise ConfigError(
            f"query {q} has {int(hits[q])} correct candidates but n_relevant={int(n_rel[q])}"
        )
    keep = n_rel > 0
    matches, n_rel = matches[keep], n_rel[keep].astype(np.float64)
    n_queries = int(keep.sum())
    out: dict[str, float | int] = {}
    if n_queries == 0:
        out.update({f"top{k}": NAN for k in ks})
        out.update({"mAP": NAN, "n_queries": 0})
        return out
    width = matches.shape[1]
    any_hit = matches.any(axis=1)
    # 0-based rank of the first hit; inf when the list holds none (beyond every k)
    first = np.where(any_hit, matches.argmax(axis=1) if width else 0, np.inf)
    for k in ks:
        out[f"top{k}"] = float(np.mean(first < k))
    ranks = np.arange(1, width + 1, dtype=np.float64)
    precision_at_hits = np.cumsum(matches, axis=1) / ranks * matches
    ap = precision_at_hits.sum(axis=1) / n_rel
    out["mAP"] = float(ap.mean())
    out["n_queries"] = n_queries
    return out


def retrieval_metrics_from_similarity(
    sim: np.ndarray,
    query_ids: Sequence[Any] | np.ndarray,
    gallery_ids: Sequence[Any] | np.ndarray,
    ks: Sequence[int] = (1, 5, 20),
) -> dict[str, float | int]:
    """:func:`retrieval_metrics` from a dense similarity matrix ``sim`` [Q, G] (higher = closer).

    ``query_ids``/``gallery_ids`` are identities. The whole gallery is ranked (ties keep
    gallery order), so mAP is exact.
    """
    queries = as_1d(query_ids, "query_ids")
    gallery = as_1d(gallery_ids, "gallery_ids")
    sim = np.asarray(sim, dtype=np.float64)
    if sim.shape != (len(queries), len(gallery)):
        raise ConfigError(f"sim must have shape ({len(queries)}, {len(gallery)}), got {sim.shape}")
    order = np.argsort(-sim, axis=1, kind="stable")
    gallery_obj = np.asarray(gallery, dtype=object)
    ranked = gallery_obj[order] if len(gallery) else np.empty((len(queries), 0), dtype=object)
    values, counts = np.unique(gallery_obj.astype(str), return_counts=True)
    count_of = dict(zip(values, counts, strict=True))
    n_rel = np.array([count_of.get(str(q), 0) for q in queries], dtype=np.int64)
    return retrieval_metrics(queries, ranked, n_rel, ks)


# --------------------------------------------------------------------------------------
# open set


def _balanced_mean(groups: np.ndarray, values: np.ndarray) -> float:
    """Mean over groups of the per-group mean of ``values``; nan when empty."""
    if len(groups) == 0:
        return NAN
    _, inverse = np.unique(groups.astype(str), return_inverse=True)
    sums = np.bincount(inverse, weights=values.astype(np.float64))
    counts = np.bincount(inverse)
    return float(np.mean(sums / counts))


def open_set_metrics(
    true_identities: Sequence[Any] | np.ndarray,
    predicted_identities: Sequence[Any] | np.ndarray,
    known_identities: Sequence[Any] | set[Any] | np.ndarray,
    new_label: Any = "new",
) -> dict[str, float | int]:
    """BAKS and BAUS: balanced accuracy on known and on unknown samples.

    As defined by wildlife-datasets (``BAKS`` and ``BAUS`` in
    ``wildlife_datasets/metrics/metrics.py``, WildlifeDatasets/wildlife-datasets): a query
    is *known* when its true identity is among ``known_identities`` (the gallery's), else
    *unknown*. BAKS averages over the known identities the per-identity accuracy of
    predicting the true identity (predicting ``new_label`` counts as wrong). BAUS averages
    over the unknown identities the per-identity fraction of queries predicted as
    ``new_label``. Averaging per identity stops a few much-photographed individuals from
    dominating. Pass the real identities of unknown queries (not ``new_label``), so that
    BAUS is balanced per individual.

    Returns ``{"baks", "baus", "n_known", "n_unknown"}`` (query counts); a metric with no
    queries of its kind is nan, as in wildlife-datasets.
    """
    true = as_1d(true_identities, "true_identities")
    pred = as_1d(predicted_identities, "predicted_identities")
    if true.shape != pred.shape:
        raise ConfigError(
            f"true_identities and predicted_identities differ in length: {len(true)} vs {len(pred)}"
        )
    known_set = set(np.asarray(list(known_identities), dtype=object).tolist())
    is_known = np.array([t in known_set for t in true.tolist()], dtype=bool)
    correct = np.array([p == t for p, t in zip(pred.tolist(), true.tolist(), strict=True)])
    is_new = np.array([p == new_label for p in pred.tolist()], dtype=bool)
    correct = correct.astype(bool) if len(correct) else np.zeros(0, dtype=bool)
    return {
        "baks": _balanced_mean(true[is_known], correct[is_known]),
        "baus": _balanced_mean(true[~is_known], is_new[~is_known]),
        "n_known": int(is_known.sum()),
        "n_unknown": int((~is_known).sum()),
    }


# --------------------------------------------------------------------------------------
# clustering


def _codes(labels: Any, name: str) -> np.ndarray:
    import pandas as pd

    arr = as_1d(labels, name)
    codes, _ = pd.factorize(pd.Series(arr, dtype=object), use_na_sentinel=True)
    if (codes < 0).any():
        raise ConfigError(f"{name} contains null labels")
    return codes.astype(np.int64)


def cluster_metrics(
    true_labels: Sequence[Any] | np.ndarray,
    pred_labels: Sequence[Any] | np.ndarray,
    noise_label: Any = None,
) -> dict[str, float | int]:
    """Agreement between a clustering and the true identities.

    Returns ``{"nmi", "ari", "pairwise_precision", "pairwise_recall", "pairwise_f1",
    "n_clusters"}``. NMI (arithmetic normalisation) and ARI are sklearn's. Pairwise
    precision: of the pairs placed in one cluster, the fraction of the same identity;
    recall: of the same-identity pairs, the fraction placed in one cluster; computed from
    the contingency table (sums of n choose 2), not pair loops. With no predicted pair
    precision is 1.0 (no false merge), with no true pair recall is 1.0. Items labelled
    ``noise_label`` (e.g. -1 from HDBSCAN) count as singleton clusters. Empty input: all
    nan, ``n_clusters`` 0.
    """
    true = _codes(true_labels, "true_labels")
    pred_arr = as_1d(pred_labels, "pred_labels")
    if len(true) != len(pred_arr):
        raise ConfigError(
            f"true_labels and pred_labels differ in length: {len(true)} vs {len(pred_arr)}"
        )
    if len(true) == 0:
        return {
            "nmi": NAN, "ari": NAN, "pairwise_precision": NAN, "pairwise_recall": NAN,
            "pairwise_f1": NAN, "n_clusters": 0,
        }  # fmt: skip
    pred = _codes(pred_arr, "pred_labels")
    if noise_label is not None:
        noise = np.array([p == noise_label for p in pred_arr.tolist()], dtype=bool)
        pred = np.where(noise, pred.max() + 1 + np.arange(len(pred)), pred)
        pred = np.unique(pred, return_inverse=True)[1]

    from scipy.sparse import coo_matrix
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    contingency = coo_matrix(
        (np.ones(len(true), dtype=np.int64), (true, pred)),
        shape=(int(true.max()) + 1, int(pred.max()) + 1),
    ).tocsr()
    contingency.sum_duplicates()

    def pairs(x: np.ndarray) -> float:
        x = np.asarray(x, dtype=np.float64)
        return float((x * (x - 1) / 2).sum())

    together = pairs(contingency.data)
    pred_pairs = pairs(np.asarray(contingency.sum(axis=0)).ravel())
    true_pairs = pairs(np.asarray(contingency.sum(axis=1)).ravel())
    precision = together / pred_pairs if pred_pairs else 1.0
    recall = together / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "nmi": float(normalized_mutual_info_score(true, pred)),
        "ari": float(adjusted_rand_score(true, pred)),
        "pairwise_precision": precision,
        "pairwise_recall": recall,
        "pairwise_f1": f1,
        "n_clusters": int(pred.max()) + 1,
    }
