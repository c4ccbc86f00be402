"""Re-ranking throughput: pairs/s with the per-image feature cache vs extracting per pair.

Measured side by side in one run, for each extractor/matcher configuration, on toy-zoo
images (real JPEG files):

The in-process variants are timed pair by pair, interleaved (so a burst of load from other
processes hits all of them alike), and reported as 1 / median time per pair.

* ``raw_matcher``: the matcher call alone on features already in memory (the ceiling);
* ``naive_per_pair``: what a naive loop does: decode, crop, resize and extract BOTH images
  of every pair, then match;
* ``cached_cold``: features extracted once per image into the on-disk cache, then each
  pair reads its two entries and matches: the warm cost plus the pair's share of the
  extraction (median time per image x images / pairs; see ``pairs_per_image``);
* ``cached_warm``: the cache already filled (a rerun, a second top-K, the calibration
  pairs sharing gallery images): read two entries and match;
* ``ray_pipeline``: ``reid_ray.rerank.rerank_candidates`` (the one entry point, with a
  fitted fusion) on the local Ray cluster from a cold cache: ``match_stage`` is pairs / wall time of the matching stage (actor start-up
  included), ``per_actor_second`` pairs / time inside the actors' match calls,
  ``end_to_end`` pairs / total wall time including feature extraction.

Usage::

    python benchmarks/rerank_throughput.py [--queries 8 --candidates 12 --naive-pairs 12]
        [--configs aliked:lightglue,disk:lightglue,sift:classical] [--out FILE]

(the default configurations are the rows of ``reid_ray.rerank.registry.LOCAL_FEATURES``).

Writes ``benchmarks/results/rerank_throughput.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

# The in-process loops run with the thread settings of a Ray worker (OMP_NUM_THREADS=1 for
# BLAS/OpenCV, torch threads set explicitly), so that they compare like with like with the
# actor pool; unbounded BLAS threads on a busy machine make them many times slower.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings above)

RESULTS = Path(__file__).resolve().parent / "results" / "rerank_throughput.json"


def _rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 3) if seconds > 0 and n else None


def _per_s(seconds: list[float]) -> float | None:
    """Pairs/s from per-pair times: 1 / median (robust to load bursts on a shared machine)."""
    return round(1.0 / float(np.median(seconds)), 3) if seconds else None


def bench_config(extractor: str, matcher: str, manifest, pairs, args, workdir: str) -> dict:
    import cv2
    import pyarrow as pa
    import torch

    from reid_ray.rerank import RerankConfig, rerank_candidates
    from reid_ray.rerank.cache import FeatureCache
    from reid_ray.rerank.features import build_extractor, feature_fingerprint, load_prepared
    from reid_ray.rerank.fusion import fit_fusion
    from reid_ray.rerank.matchers import PairScorer

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    cfg = RerankConfig(
        extractor=extractor,
        matcher=matcher,
        max_keypoints=args.max_keypoints,
        resize_long_side=args.resize,
        queries_per_batch=2,
    )
    rows = {r["image_id"]: r for r in manifest.table.to_pylist()}
    extractor_obj = build_extractor(cfg)
    scorer = PairScorer(cfg)

    def extract(row):
        return extractor_obj.extract(*load_prepared(row, cfg))

    images = list(dict.fromkeys([q for q, _ in pairs] + [g for _, g in pairs]))
    scorer.score(extract(rows[images[0]]), [extract(rows[images[1]])])  # warm-up

    # extraction once per image, into the on-disk cache
    cache_dir = os.path.join(workdir, f"cache-{extractor}-{matcher}")
    cache = FeatureCache(cache_dir, feature_fingerprint(cfg))
    t_images = []
    for i in images:
        t0 = time.perf_counter()
        cache.put(i, extract(rows[i]))
        t_images.append(time.perf_counter() - t0)
    feats = {i: cache.get(i) for i in images}

    # the per-pair variants interleaved pair by pair, so a load burst hits all of them
    t_raw, t_warm, t_naive = [], [], []
    for k, (q, g) in enumerate(pairs):
        t0 = time.perf_counter()
        scorer.score(feats[q], [feats[g]])
        t_raw.append(time.perf_counter() - t0)
        reader = FeatureCache(cache_dir, feature_fingerprint(cfg), memory_items=0)
        t0 = time.perf_counter()
        scorer.score(reader.get(q), [reader.get(g)])
        t_warm.append(time.perf_counter() - t0)
        if k < args.naive_pairs:
            t0 = time.perf_counter()
            scorer.score(extract(rows[q]), [extract(rows[g])])
            t_naive.append(time.perf_counter() - t0)
    extract_per_image = float(np.median(t_images))
    n = len(pairs)
    # cold cache: each pair pays the warm cost plus its share of the once-per-image extraction
    cold_per_pair = float(np.median(t_warm)) + extract_per_image * len(images) / n

    # the Ray pipeline, cold cache (a separate run: it cannot be interleaved)
    table = pa.table(
        {
            "query_id": [q for q, _ in pairs],
            "gallery_id": [g for _, g in pairs],
            "score": np.linspace(1.0, 0.0, n),
        }
    )
    same = np.arange(40) % 4 == 0
    fusion = fit_fusion(np.linspace(0, 1, 40) + same, np.arange(40.0) + 50 * same, same)
    out = os.path.join(workdir, f"ray-{extractor}-{matcher}")
    t0 = time.perf_counter()
    result = rerank_candidates(table, manifest, cfg, out, fusion=fusion)
    t_ray = time.perf_counter() - t0
    st = result.stats["scoring"]
    res = {
        "config": f"{extractor}+{matcher}",
        "pairs": n,
        "images": len(images),
        "pairs_per_image": round(n / len(images), 2),
        "extract_ms_per_image": round(1000 * extract_per_image, 1),
        "match_ms_per_pair": round(1000 * float(np.median(t_raw)), 2),
        "pairs_per_s": {
            "raw_matcher": _per_s(t_raw),
            "naive_per_pair": _per_s(t_naive),
            "cached_cold": round(1.0 / cold_per_pair, 3),
            "cached_warm": _per_s(t_warm),
            "ray_pipeline": {
                "match_stage": st.get("pairs_per_s"),
                "per_actor_second": st.get("pairs_per_actor_s"),
                "end_to_end": _rate(n, t_ray),
                "actors": (st.get("pool") or {}).get("actors"),
                "cpus_per_actor": (st.get("pool") or {}).get("cpus_per_actor"),
            },
        },
        "naive_pairs_measured": len(t_naive),
    }
    ps = res["pairs_per_s"]
    if ps["naive_per_pair"]:
        res["speedup_cached_cold_vs_naive"] = round(ps["cached_cold"] / ps["naive_per_pair"], 2)
        res["speedup_cached_warm_vs_naive"] = round(ps["cached_warm"] / ps["naive_per_pair"], 2)
        res["cached_warm_vs_raw_matcher"] = round(ps["cached_warm"] / ps["raw_matcher"], 3)
    return res


def main(argv: list[str] | None = None) -> dict:
    from reid_ray.rerank.registry import default_pairings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--candidates", type=int, default=12)
    p.add_argument("--naive-pairs", type=int, default=12)
    p.add_argument("--max-keypoints", type=int, default=256)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default=",".join(f"{e}:{m}" for e, m in default_pairings()))
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import torch

    from reid_ray import io as rio
    from reid_ray.data import read_manifest
    from reid_ray.runtime import init_ray
    from reid_ray.synth import generate_zoo

    workdir = tempfile.mkdtemp(prefix="rr-rerank-bench-")
    individuals = max(4, args.queries)
    generate_zoo(
        os.path.join(workdir, "zoo"),
        species=2,
        individuals=individuals,
        images_per=4,
        size=256,
        seed=0,
    )
    manifest = read_manifest(os.path.join(workdir, "zoo", "metadata.csv"))
    ids = manifest.table["image_id"].to_pylist()
    rng = np.random.default_rng(0)
    queries = [ids[i] for i in rng.choice(len(ids), args.queries, replace=False)]
    gallery = [i for i in ids if i not in queries]
    pairs = [(q, g) for q in queries for g in rng.choice(gallery, args.candidates, replace=False)]
    init_ray()
    results = []
    for spec in args.configs.split(","):
        extractor, matcher = spec.split(":")
        results.append(bench_config(extractor, matcher, manifest, pairs, args, workdir))
        print(results[-1], flush=True)
    report = {
        "benchmark": "rerank_throughput",
        "what": {
            "raw_matcher": "matcher call alone, features in memory",
            "naive_per_pair": "decode + extract both images for every pair, then match",
            "cached_cold": "cached_warm time per pair + the pair's share of the once-per-image "
            "extraction (median extraction time per image x images / pairs; depends on "
            "pairs_per_image)",
            "cached_warm": "cache already filled: read two entries and match per pair",
            "ray_pipeline": "rerank_candidates on the local Ray cluster, cold cache: match_stage = pairs / wall "
            "time of the matching stage (actor start-up included); per_actor_second = pairs / time "
            "inside the actors' match calls; end_to_end = pairs / total wall time incl. extraction",
        },
        "settings": {
            "queries": args.queries,
            "candidates_per_query": args.candidates,
            "max_keypoints": args.max_keypoints,
            "resize_long_side": args.resize,
            "torch_threads_in_process": args.threads,
            "blas_threads_in_process": os.environ.get("OMP_NUM_THREADS"),
            "image_size": 256,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
        },
        "results": results,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rio.write_json_atomic(args.out, report)
    return report


if __name__ == "__main__":
    main()
