"""How the AL samplers scale: 10,000 pairs chosen from 140,000 embeddings.

Clustered synthetic vectors (``--identities`` x ``--per``, each image its identity's centre
plus noise, so neighbouring identities overlap) stand in for a large programme's
embeddings. The k-NN graph is built with a coarse FAISS IVF (``--graph fast``: 1024 lists, 8 probed;
its recall is not what is measured) or the one AL builds (``--graph al``:
``reid_ray.active.graph.knn_graph``, IVF with nlist/8 probed above 100k: minutes more at
this size). The three clusterings the samplers read are, by default, the truth
perturbed the way each clustering errs (``dbscan``: 8% of the images as noise and 5% of
the identities merged with a neighbour; ``finch``: 12% of the identities merged with a
neighbour; ``kmeans``: 10% split in two), so that many k-NN edges are disputed, as they are
on real embeddings; ``--real-clusterings`` runs ``cluster_all`` instead (much slower at this
size: the clusterings are not what this measures). Each sampler then picks ``--pairs``
pairs twice: round 0 (nothing known) and round 1 (round 0's pairs asked, its same-identity
pairs as must-links). Measured per phase: wall seconds and peak resident memory of this
process (psutil, sampled every 10 ms). ``--legacy-pairs`` also times the ambiguity-aware
sampler as it was before bounded pools (one pass over every disputed edge per chosen pair)
on that many pairs, to give its cost per pair on the same graph, side by side.

    python benchmarks/al_sampling_scale.py            # 14,000 x 10 = 140,000, 10,000 pairs
    python benchmarks/al_sampling_scale.py --identities 1400 --pairs 1000 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from result_record import result_record, write_result  # noqa: E402 - benchmarks/ on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "al_sampling_scale.json")
logger = logging.getLogger("al_sampling_scale")


def _psutil():
    try:
        import psutil
    except ImportError:  # the `bench` extra; Ray ships a copy on its own path
        import importlib

        importlib.import_module("ray")  # puts ray/thirdparty_files on sys.path
        psutil = importlib.import_module("psutil")
    return psutil


class PeakRss(threading.Thread):
    """Peak resident memory of this process while a phase runs (sampled every 10 ms)."""

    def __init__(self):
        super().__init__(daemon=True)
        self._proc = _psutil().Process()
        self.start_mb = self.peak_mb = self._proc.memory_info().rss / 2**20
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._halt.wait(0.01)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
        return {"rss_start_mb": round(self.start_mb, 1), "rss_peak_mb": round(self.peak_mb, 1)}


def measured(fn, *args, **kwargs):
    """``(result, {seconds, rss_start_mb, rss_peak_mb})``."""
    sampler = PeakRss()
    sampler.start()
    t = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    finally:
        seconds = time.perf_counter() - t
        mem = sampler.stop()
    return out, {"seconds": round(seconds, 3), **mem}


def synthetic_embeddings(identities: int, per: int, dim: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(identities), per)
    x = centres[truth] + noise * rng.normal(size=(len(truth), dim)).astype(np.float32) / np.sqrt(
        dim
    )
    return x.astype(np.float32), truth, centres


def fast_knn_graph(x: np.ndarray, k: int, nlist: int = 1024, nprobe: int = 8):
    """A coarse k-NN graph (FAISS IVF, inner product on unit vectors), self excluded."""
    import faiss

    from reid_ray.active.graph import KnnGraph, l2_normalise

    x = l2_normalise(x)
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(x[np.random.default_rng(0).permutation(len(x))[: nlist * 64]])
    index.add(x)
    index.nprobe = nprobe
    sim, idx = index.search(x, k + 1)
    own = idx == np.arange(len(x))[:, None]
    keep = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(k + 1) < k)
    idx = idx[keep].reshape(len(x), k)
    sim = sim[keep].reshape(len(x), k)
    return KnnGraph(idx=idx.astype(np.int64), sim=np.where(idx < 0, -np.inf, sim))


def perturbed_clusterings(graph, truth, centres, seed: int):
    """Three labelings that err like DBSCAN, FINCH and k-means would (see the docstring)."""
    from reid_ray.active.clustering import NOISE, Clusterings, relabel
    from reid_ray.active.graph import knn_graph

    rng = np.random.default_rng(seed)
    n_ids = len(centres)
    nearest = knn_graph(centres, 1).idx[:, 0]  # each identity's nearest other identity

    def merged(share):
        target = np.arange(n_ids)
        pick = rng.random(n_ids) < share
        target[pick] = nearest[pick]
        return target[truth]

    db = merged(0.05)
    db[rng.random(len(truth)) < 0.08] = NOISE
    fi = merged(0.12)
    split = rng.random(n_ids) < 0.10
    km = truth * 2 + (split[truth] & (rng.random(len(truth)) < 0.5))
    return Clusterings(graph=graph, dbscan=relabel(db), finch=relabel(fi), kmeans=relabel(km))


def legacy_aas_seconds_per_pair(features, clusterings, count: int) -> float:
    """The ambiguity-aware greedy as it was (every disputed edge scanned per chosen pair,
    ``np.isin`` over the covered regions), timed on ``count`` pairs."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    from reid_ray.active.graph import l2_normalise
    from reid_ray.active.samplers import disagreement, threshold

    t = time.perf_counter()
    a, b, s, p = disagreement(clusterings)
    tau = threshold(clusterings.graph, clusterings.dbscan)
    disputed = (p > 0) & (p < 1)
    a, b, s, p = a[disputed], b[disputed], s[disputed], p[disputed]
    entropy = -(p * np.log2(np.clip(p, 1e-9, 1)) + (1 - p) * np.log2(np.clip(1 - p, 1e-9, 1)))
    closeness = np.exp(-(((s - tau) / max(float(np.std(s)), 1e-6)) ** 2))
    score = 0.5 * entropy + 0.5 * closeness + 1e-6
    n = len(features)
    adj = sparse.csr_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    region = connected_components(adj, directed=False)[1][a]
    x = l2_normalise(features)
    mid = l2_normalise(x[a] + x[b])
    setup = time.perf_counter() - t
    t = time.perf_counter()
    chosen, covered = [], set()
    min_dist = np.full(len(a), np.inf)
    n_regions = len(np.unique(region))
    while len(chosen) < count:
        gain = score * np.where(np.isfinite(min_dist), min_dist, 2.0)
        if len(covered) < n_regions:
            gain = np.where(np.isin(region, list(covered)), -np.inf, gain)
        gain[chosen] = -np.inf
        k = int(np.argmax(gain))
        chosen.append(k)
        covered.add(int(region[k]))
        min_dist = np.minimum(min_dist, 1.0 - mid @ mid[k])
    per_pair = (time.perf_counter() - t) / count
    logger.info("legacy aas: setup %.1f s, %.3f s per pair", setup, per_pair)
    return per_pair


def describe(pairs, truth, votes_of) -> dict:
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    return {
        "pairs": len(pairs),
        "distinct": len(set(pairs)),
        "same_identity_share": round(float((truth[a] == truth[b]).mean()), 4) if len(a) else None,
        "disputed_share": round(float(np.mean([0 < votes_of.get(p, 0) < 1 for p in pairs])), 4)
        if pairs
        else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--identities", type=int, default=14_000)
    p.add_argument("--per", type=int, default=10)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--noise", type=float, default=0.9, help="noise norm relative to a centre")
    p.add_argument("--pairs", type=int, default=10_000)
    p.add_argument("--k", type=int, default=20, help="neighbours in the k-NN graph")
    p.add_argument("--samplers", nargs="+", default=["random", "random_knn", "margin", "aas"])
    p.add_argument("--graph", choices=["fast", "al"], default="fast")
    p.add_argument("--real-clusterings", action="store_true")
    p.add_argument("--legacy-pairs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from reid_ray.active.clustering import ClusterConfig, cluster_all
    from reid_ray.active.graph import knn_graph
    from reid_ray.active.samplers import Known, disagreement, sample_pairs

    phases: dict[str, dict] = {}
    (x, truth, centres), phases["embeddings"] = measured(
        synthetic_embeddings, args.identities, args.per, args.dim, args.noise, args.seed
    )
    logger.info("%d embeddings of dim %d", len(x), x.shape[1])
    if args.real_clusterings:
        clusterings, phases["graph_and_clusterings"] = measured(
            cluster_all, x, ClusterConfig(k=args.k)
        )
        graph = clusterings.graph
    else:
        build = knn_graph if args.graph == "al" else fast_knn_graph
        graph, phases["graph"] = measured(build, x, args.k)
        clusterings, phases["clusterings"] = measured(
            perturbed_clusterings, graph, truth, centres, args.seed
        )
    logger.info("graph and clusterings: %s", phases)
    a, b, _, votes = disagreement(clusterings)
    votes_of = dict(zip(zip(a.tolist(), b.tolist(), strict=True), votes.tolist(), strict=True))
    edges = {"edges": len(a), "disputed": int(((votes > 0) & (votes < 1)).sum())}
    logger.info("%s", edges)

    samplers: dict[str, dict] = {}
    for name in args.samplers:
        first, m0 = measured(
            sample_pairs, name, x, clusterings, args.pairs, known=Known(len(x)), seed=args.seed
        )
        must = [q for q in first if truth[q[0]] == truth[q[1]]]
        known = Known(len(x), must=must, asked=first)
        second, m1 = measured(
            sample_pairs, name, x, clusterings, args.pairs, known=known, seed=args.seed + 1
        )
        samplers[name] = {
            "round0": {**m0, **describe(first, truth, votes_of)},
            "round1": {**m1, **describe(second, truth, votes_of),
                       "overlap_with_round0": len(set(first) & set(second))},
        }  # fmt: skip
        logger.info("%s: %s", name, json.dumps(samplers[name]))
    legacy = None
    if args.legacy_pairs and "aas" in args.samplers:
        per_pair, m = measured(legacy_aas_seconds_per_pair, x, clusterings, args.legacy_pairs)
        legacy = {
            "pairs_timed": args.legacy_pairs,
            "seconds_per_pair": round(per_pair, 4),
            "projected_seconds_for_pairs": round(per_pair * args.pairs, 1),
            **m,
        }
    record = result_record(
        args,
        "wall seconds and peak resident memory (psutil, this process, sampled every 10 ms) of "
        "each phase; per sampler, two calls of sample_pairs for --pairs pairs: round0 with "
        "nothing known, round1 with round0's pairs asked and its same-identity pairs "
        "must-linked; same_identity_share and disputed_share (edges on which the three "
        "clusterings disagree) of the pairs chosen; legacy: the ambiguity-aware greedy "
        "before bounded pools, per chosen pair on the same graph",
        n_embeddings=len(x),
        graph=edges,
        phases=phases,
        samplers=samplers,
        legacy_aas=legacy,
    )
    write_result(args.out, record)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
