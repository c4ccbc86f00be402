"""Three complementary clusterings of an embedding set, and the USL pseudo-labels.

- ``dbscan_jaccard``: DBSCAN over k-reciprocal Jaccard distances (Cluster-Contrast's
  pseudo-labels); density-based, leaves outliers as noise (-1).
- ``finch``: first-neighbour clustering (Sarfraz et al. 2019), parameter-free and
  hierarchical; the level whose cluster count is nearest a target is returned.
- ``kmeans``: FAISS spherical k-means, a partition of everything into ``k`` blobs.

They make different mistakes, so where they disagree the embedding space is ambiguous:
that is where the ambiguity-aware sampler asks. All work from the sparse k-NN graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from reid_ray.active.graph import KnnGraph, jaccard_distance, knn_graph, l2_normalise
from reid_ray.errors import ConfigError

NOISE = -1


@dataclass(frozen=True)
class ClusterConfig:
    """Settings of the clusterings. Cluster-Contrast uses k1=30, k2=6, eps=0.6 on person
    re-ID (~17 images per person); animal sets hold far fewer images per individual
    (DogFaceNet ~5, toy zoos 6-8), so the neighbourhoods are smaller here. On a 30 x 8 toy
    zoo at 64 px (pretrained features) k1=20/eps=0.6 merged 120 images into 2 clusters;
    k1=6/eps=0.5 gave the best ARI of the grid tried (k1 6-20, eps 0.3-0.6)."""

    k: int = 20  # neighbours in the k-NN graph
    k1: int = 6  # k-reciprocal neighbourhood of the Jaccard distance (capped at N-1)
    k2: int = 3  # query expansion
    eps: float = 0.5  # DBSCAN radius on the Jaccard distance
    min_samples: int = 2  # DBSCAN core-point size (the point itself counts)
    kmeans_iter: int = 25
    seed: int = 0


def relabel(labels: np.ndarray, noise: int = NOISE) -> np.ndarray:
    """Consecutive labels 0..C-1 in order of first appearance; ``noise`` kept."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(len(labels), noise, dtype=np.int64)
    ok = labels != noise
    if ok.any():
        _, first, inverse = np.unique(labels[ok], return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first))
        out[ok] = order[inverse]
    return out


def n_clusters(labels: np.ndarray) -> int:
    labels = np.asarray(labels)
    return int(len(np.unique(labels[labels != NOISE])))


def dbscan_jaccard(graph: KnnGraph, cfg: ClusterConfig) -> np.ndarray:
    """DBSCAN on the sparse Jaccard distance matrix; noise is -1."""
    return dbscan_sparse(jaccard_distance(graph, cfg.k1, cfg.k2), cfg.eps, cfg.min_samples)


def dbscan_sparse(dist: sparse.csr_matrix, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN on a sparse distance matrix (left unchanged); only stored entries can be
    neighbours. Noise is -1."""
    from sklearn.cluster import DBSCAN

    dist = dist.copy()
    dist.data[dist.data > eps] = 0.0  # entries beyond eps are never neighbours
    dist.eliminate_zeros()
    dist = dist.tolil()
    dist.setdiag(1e-9)
    model = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed")
    return relabel(model.fit_predict(dist.tocsr()))


def first_neighbour_partition(nn1: np.ndarray) -> np.ndarray:
    """FINCH's step: link every item to its first neighbour; clusters are the connected
    components (which also joins items sharing a first neighbour)."""
    n = len(nn1)
    ok = nn1 >= 0
    adj = sparse.csr_matrix((np.ones(int(ok.sum())), (np.arange(n)[ok], nn1[ok])), shape=(n, n))
    _, labels = connected_components(adj, directed=True, connection="weak")
    return labels.astype(np.int64)


def finch(
    features: np.ndarray, graph: KnnGraph | None = None, target: int | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """FINCH hierarchy: returns (chosen labels, every level's labels). Each level links
    cluster means to their first neighbour. ``target``: choose the level whose cluster
    count is nearest (default: the first level)."""
    x = l2_normalise(features)
    graph = graph or knn_graph(x, 1)
    labels = first_neighbour_partition(graph.idx[:, 0])
    levels = [labels]
    while True:
        c = int(labels.max()) + 1
        if c <= 2:
            break
        means = np.zeros((c, x.shape[1]), dtype=np.float32)
        np.add.at(means, labels, x)
        up = first_neighbour_partition(knn_graph(means, 1).idx[:, 0])
        if int(up.max()) + 1 == c:
            break
        labels = up[labels]
        levels.append(labels)
    if target is None:
        return relabel(levels[0]), [relabel(lv) for lv in levels]
    counts = np.array([int(lv.max()) + 1 for lv in levels])
    above = np.flatnonzero(counts >= target)
    start = levels[int(above[-1])] if len(above) else levels[0]
    return _merge_to(x, start, target), [relabel(lv) for lv in levels]


def _merge_to(x: np.ndarray, labels: np.ndarray, target: int) -> np.ndarray:
    """FINCH's last step: from a level with too many clusters, merge the most similar
    pairs of cluster means (disjoint pairs, several per pass) until ``target`` remain."""
    labels = relabel(labels)
    while int(labels.max()) + 1 > max(target, 2):
        c = int(labels.max()) + 1
        means = np.zeros((c, x.shape[1]), dtype=np.float32)
        np.add.at(means, labels, x)
        g = knn_graph(means, 1)
        order = np.argsort(-g.sim[:, 0], kind="stable")
        parent = np.arange(c)
        used: set[int] = set()
        for a in order.tolist():
            b = int(g.idx[a, 0])
            if len(used) // 2 >= c - target:
                break
            if a in used or b in used or b < 0:
                continue
            parent[b] = a
            used.update((a, b))
        labels = relabel(parent[labels])
    return labels


def kmeans(features: np.ndarray, k: int, *, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Spherical k-means with FAISS; every item gets a cluster."""
    import faiss

    x = l2_normalise(features)
    k = int(max(1, min(k, len(x))))
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iters,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    return relabel(assign.ravel())


@dataclass
class Clusterings:
    """The three clusterings of one embedding set and the graph they came from."""

    graph: KnnGraph
    dbscan: np.ndarray
    finch: np.ndarray
    kmeans: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"dbscan": self.dbscan, "finch": self.finch, "kmeans": self.kmeans}


def cluster_all(features: np.ndarray, cfg: ClusterConfig | None = None) -> Clusterings:
    """DBSCAN (the pseudo-labels), FINCH and k-means at DBSCAN's granularity."""
    cfg = cfg or ClusterConfig()
    if len(features) < 3:
        raise ConfigError(f"clustering needs at least 3 embeddings, got {len(features)}")
    x = l2_normalise(features)
    graph = knn_graph(x, max(cfg.k, cfg.k1))
    db = dbscan_jaccard(graph, cfg)
    # the other two at the granularity DBSCAN found (noise points count as singletons)
    target = max(2, n_clusters(db) + int(np.sqrt((db == NOISE).sum())))
    fi, _ = finch(x, graph, target)
    km = kmeans(x, target, iters=cfg.kmeans_iter, seed=cfg.seed)
    return Clusterings(graph=graph, dbscan=db, finch=fi, kmeans=km)


def usl_pseudo_labels(features: np.ndarray, cfg: ClusterConfig | None = None) -> np.ndarray:
    """The USL baseline's pseudo-identities: DBSCAN on Jaccard distances, noise -1."""
    cfg = cfg or ClusterConfig()
    graph = knn_graph(features, max(cfg.k, cfg.k1))
    return dbscan_jaccard(graph, cfg)


__all__ = [
    "NOISE",
    "ClusterConfig",
    "Clusterings",
    "cluster_all",
    "dbscan_jaccard",
    "dbscan_sparse",
    "finch",
    "first_neighbour_partition",
    "kmeans",
    "n_clusters",
    "relabel",
    "usl_pseudo_labels",
]
