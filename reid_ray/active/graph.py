"""The k-NN graph of an embedding set and its k-reciprocal Jaccard distances, sparse.

Clustering a large embedding set must not build a dense N x N matrix: the neighbours come
from a FAISS index (``reid_ray.index``: exact up to its threshold, IVF above), and the
Jaccard distances of k-reciprocal encoding (Zhong et al. 2017, as used by Cluster-Contrast)
are only computed for pairs whose encodings overlap, as a ``scipy.sparse`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from reid_ray.errors import ConfigError


@dataclass
class KnnGraph:
    """``idx`` [N, k] neighbour rows (best first, the item itself excluded; -1 pads) and
    their cosine similarities ``sim`` [N, k] (-inf pads)."""

    idx: np.ndarray
    sim: np.ndarray

    @property
    def n(self) -> int:
        return len(self.idx)

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unique undirected edges ``(i, j, sim)`` with ``i < j``."""
        rows = np.repeat(np.arange(self.n), self.idx.shape[1])
        cols = self.idx.ravel()
        sims = self.sim.ravel()
        ok = cols >= 0
        a, b, s = np.minimum(rows, cols)[ok], np.maximum(rows, cols)[ok], sims[ok]
        key = a.astype(np.int64) * self.n + b
        _, first = np.unique(key, return_index=True)
        return a[first], b[first], s[first].astype(np.float32)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_graph(features: np.ndarray, k: int, *, exact_threshold: int | None = None) -> KnnGraph:
    """The ``k`` nearest neighbours (cosine) of every row of ``features`` [N, D], self
    excluded, from a FAISS index (no N x N matrix)."""
    from reid_ray.index import DEFAULT_EXACT_THRESHOLD, build_index, search

    x = l2_normalise(features)
    n = len(x)
    if x.ndim != 2 or n < 2:
        raise ConfigError(f"a k-NN graph needs at least 2 embeddings, got shape {x.shape}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    k = min(k, n - 1)
    ids = np.arange(n).astype(str)
    index = build_index(
        x, ids, exact_threshold=exact_threshold or DEFAULT_EXACT_THRESHOLD, use_gpu="auto"
    )
    scores, found = search(index, x, k, query_ids=ids, exclude_self=True)
    idx = np.array([[-1 if v is None else int(v) for v in row] for row in found], dtype=np.int64)
    return KnnGraph(idx=idx.reshape(n, k), sim=scores.reshape(n, k))


def _reciprocal(graph: KnnGraph, i: int, k: int) -> np.ndarray:
    """The k-reciprocal neighbours of ``i`` (itself included)."""
    near = graph.idx[i, :k]
    near = near[near >= 0]
    back = graph.idx[near, :k]
    keep = (back == i).any(axis=1)
    return np.concatenate([[i], near[keep]])


def jaccard_distance(graph: KnnGraph, k1: int = 20, k2: int = 6) -> sparse.csr_matrix:
    """k-reciprocal Jaccard distances as a sparse symmetric matrix [N, N].

    Stored entries are the pairs whose (expanded, query-expanded) k-reciprocal encodings
    overlap, with distance in [0, 1); pairs not stored are at distance 1. The diagonal is
    stored (a tiny positive value), so sklearn's precomputed-sparse DBSCAN counts each point
    among its own neighbours, as with a dense matrix.
    """
    n = graph.n
    k1 = max(1, min(k1, graph.idx.shape[1]))
    half = max(1, int(round(k1 / 2)))
    rows, cols, vals = [], [], []
    for i in range(n):
        recip = _reciprocal(graph, i, k1)
        expanded = set(recip.tolist())
        for c in recip[1:]:
            cand = _reciprocal(graph, int(c), half)
            if len(np.intersect1d(cand, recip)) > 2 / 3 * len(cand):
                expanded.update(cand.tolist())
        members = np.fromiter(expanded, dtype=np.int64)
        # similarity of i to its encoding members: own row of the graph (1 for itself)
        sim_of = dict(zip(graph.idx[i].tolist(), graph.sim[i].tolist(), strict=True))
        sims = np.array([1.0 if m == i else sim_of.get(int(m), np.nan) for m in members])
        # members outside i's list (added by expansion): similarity through the graph is
        # unknown; use the weakest listed similarity, a conservative stand-in
        weakest = np.nanmin(sims) if np.isfinite(sims).any() else 0.0
        sims = np.where(np.isfinite(sims), sims, weakest)
        weights = np.exp(-(2.0 - 2.0 * sims))  # exp(-squared euclidean) of unit vectors
        rows.append(np.full(len(members), i))
        cols.append(members)
        vals.append(weights / weights.sum())
    v = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    if k2 > 1:  # local query expansion: average the encodings of the k2 nearest
        k2 = min(k2, graph.idx.shape[1] + 1)
        nbr = np.concatenate([np.arange(n)[:, None], graph.idx[:, : k2 - 1]], axis=1)
        r = np.repeat(np.arange(n), nbr.shape[1])
        c = nbr.ravel()
        ok = c >= 0
        counts = ok.reshape(n, -1).sum(axis=1)
        avg = sparse.csr_matrix((1.0 / counts[r[ok]], (r[ok], c[ok])), shape=(n, n))
        v = (avg @ v).tocsr()
    return _min_overlap_distance(v)


def _min_overlap_distance(v: sparse.csr_matrix) -> sparse.csr_matrix:
    """``1 - sum(min)/sum(max)`` between rows of ``v`` (rows sum to 1), for every pair of
    rows sharing a column; by columns (an inverted index), never N x N."""
    n = v.shape[0]
    csc = v.tocsc()
    pair_rows, pair_cols, mins = [], [], []
    for c in range(n):
        start, stop = csc.indptr[c], csc.indptr[c + 1]
        if stop - start == 0:
            continue
        r = csc.indices[start:stop]
        x = csc.data[start:stop]
        pair_rows.append(np.repeat(r, len(r)))
        pair_cols.append(np.tile(r, len(r)))
        mins.append(np.minimum.outer(x, x).ravel())
    overlap = sparse.csr_matrix(
        (np.concatenate(mins), (np.concatenate(pair_rows), np.concatenate(pair_cols))),
        shape=(n, n),
    )  # duplicates are summed: sum over shared columns of min
    overlap.sum_duplicates()
    dist = overlap.copy()
    m = np.clip(dist.data, 0.0, 1.0)
    dist.data = np.maximum(1.0 - m / (2.0 - m), 1e-9)
    dist = dist.tolil()
    dist.setdiag(1e-9)
    return dist.tocsr()


__all__ = ["KnnGraph", "jaccard_distance", "knn_graph", "l2_normalise"]
