"""Scale: each stage at two sizes ten times apart; throughput and PEAK DRIVER MEMORY.

Issue 13's target is that the driver's memory does not grow with the number of images:
at 10x the work, peak driver memory <= 1.25x. Each (stage, size) runs in a fresh child
process with its own local Ray cluster, so that one measurement's allocations do not
raise the next one's baseline. In the child a thread samples the RSS of the driver
process only (psutil, every 20 ms; Ray workers are separate processes and not counted)
around the stage call:

* ``embed``: ``reid_ray.embed.embed_manifest`` of tiny generated JPEGs (32-48 px) with a
  random-init resnet18 (``timm-random:resnet18``) at 32 px;
* ``index`` / ``search``: ``index_embeddings`` of a gallery of generated vectors (built on
  a Ray worker: ``on_ray=True``), then
  ``search_embeddings`` (top-100, searcher actors) of a tenth as many queries;
* ``rerank``: ``rerank_candidates`` (SIFT + classical matcher, a given fusion) over
  queries x 10 candidates of the tiny images; beside it, in the same child and with the
  pool's thread count, the raw matcher's pairs/s on the same pairs (features in memory):
  ``match_vs_raw`` is the Ray match stage's rate over the raw rate;
* ``train``: one epoch of ``reid_ray.train.train`` (2 workers, random-init resnet18, 32 px).

Reported per stage and size: wall seconds, throughput, peak driver RSS, its growth over
the RSS just before the call, and the machine's load average; per stage the ratios 10x/1x
(``peak_rss_ratio`` is the issue's figure; ``growth_ratio`` shows what the stage itself
adds above the imports).

Usage::

    python benchmarks/scale.py [--quick] [--stages embed,search,rerank,train] [--out FILE]

Writes ``benchmarks/results/scale.json`` (``scale_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGET = 1.25
MODEL = "timm-random:resnet18"

# (1x, 10x) per stage: images for embed, gallery vectors for search, pairs for rerank,
# training images for one epoch
SIZES = {
    "full": {
        "embed": (1400, 14000),
        "search": (14000, 140000),
        "rerank": (200, 2000),
        "train": (140, 1400),
    },
    "quick": {
        "embed": (200, 2000),
        "search": (2000, 20000),
        "rerank": (40, 400),
        "train": (64, 640),
    },
}
STAGES = ("embed", "search", "rerank", "train")
CANDIDATES = 10  # per rerank query: the other 6 images of its identity, 4 of the next one
PER_ID = 7  # generated images per identity
DIM = 128  # generated gallery vectors

logger = logging.getLogger("scale")


# -- measuring -----------------------------------------------------------------------------


class PeakRss:
    """Peak RSS of this process while the block runs, sampled in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.proc = psutil.Process(os.getpid())
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def record(self) -> dict:
        mb = 1024 * 1024
        return {
            "rss_before_mb": round(self.baseline / mb, 1),
            "peak_rss_mb": round(self.peak / mb, 1),
            "growth_mb": round((self.peak - self.baseline) / mb, 1),
        }


# -- generated data ------------------------------------------------------------------------


def make_images(folder: str, n: int, seed: int = 0, per_identity: int = PER_ID) -> str:
    """``n`` tiny JPEGs (32-48 px): per identity a smooth random texture, per image a
    random crop, flip and noise, so SIFT finds keypoints and identities differ. Writes
    ``folder/all.csv`` (image_id, path, identity); returns it."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    lines = ["image_id,path,identity"]
    textures = {}
    for i in range(n):
        ident = i // per_identity  # contiguous: every prefix has whole identities
        if ident not in textures:
            # blocky, lightly blurred: ~40 SIFT keypoints on a 40 px crop at 128 px
            small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            tex = cv2.resize(small, (64, 64), interpolation=cv2.INTER_NEAREST)
            textures[ident] = cv2.GaussianBlur(tex, (3, 3), 0)
        side = int(rng.integers(32, 49))
        x, y = rng.integers(0, 64 - side + 1, 2)
        img = textures[ident][y : y + side, x : x + side].astype(np.int16)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        name = f"img/{i:07d}.jpg"
        cv2.imwrite(os.path.join(folder, name), img)
        lines.append(f"im{i:07d},{name},id{ident:06d}")
    path = os.path.join(folder, "all.csv")
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def sub_manifest(all_csv: str, n: int) -> str:
    """The first ``n`` rows of ``all_csv`` as their own manifest beside it."""
    lines = Path(all_csv).read_text().splitlines()
    path = os.path.join(os.path.dirname(all_csv), f"m{n}.csv")
    Path(path).write_text("\n".join(lines[: n + 1]) + "\n")
    return path


def write_vectors(folder: str, n: int, seed: int, prefix: str, rows_per_part: int = 16384):
    """``n`` random unit vectors as an embed output (Parquet parts, model key "bench")."""
    import numpy as np

    from reid_ray import parts
    from reid_ray.embed.store import EMBEDDINGS_DIR, embeddings_table

    rng = np.random.default_rng(seed)
    run = parts.new_run_id()
    for seq, start in enumerate(range(0, n, rows_per_part)):
        m = min(rows_per_part, n - start)
        x = rng.standard_normal((m, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"{prefix}{i:08d}" for i in range(start, start + m)]
        parts.write_part(
            os.path.join(folder, EMBEDDINGS_DIR),
            embeddings_table(ids, x, "bench"),
            run=run,
            seq=seq,
        )


# -- one stage at one size (child process) -------------------------------------------------


def stage_embed(n: int, work: str) -> dict:
    from reid_ray.data import read_manifest
    from reid_ray.embed import EmbedConfig, embed_manifest

    manifest = read_manifest(sub_manifest(os.path.join(work, "images", "all.csv"), n))
    out = os.path.join(work, f"embed-{n}")
    with PeakRss() as mem:
        t0 = time.perf_counter()
        s = embed_manifest(manifest, MODEL, out, EmbedConfig(image_size=32), overwrite=True)
        wall = time.perf_counter() - t0
    return {
        "images": n,
        "embedded": s.n_embedded,
        "errors": s.n_errors,
        "seconds": round(wall, 2),
        "images_per_s": round(n / wall, 1),
        "plan": s.plan,
        **mem.record(),
    }


def stage_search(n: int, work: str) -> dict:
    from reid_ray.index import index_embeddings, search_embeddings

    gallery, queries = os.path.join(work, f"gal-{n}"), os.path.join(work, f"qry-{n}")
    write_vectors(gallery, n, seed=1, prefix="g")
    write_vectors(queries, n // 10, seed=2, prefix="q")
    idx = os.path.join(work, f"index-{n}")
    with PeakRss() as mem_index:
        t0 = time.perf_counter()
        index_embeddings(gallery, idx, on_ray=True)
        t_index = time.perf_counter() - t0
    with PeakRss() as mem:
        t0 = time.perf_counter()
        s = search_embeddings(idx, queries, os.path.join(work, f"cand-{n}"), k=100, actors=1)
        wall = time.perf_counter() - t0
    return {
        "gallery": n,
        "queries": s.n_queries,
        "candidates": s.n_candidates,
        "seconds": round(wall, 2),
        "queries_per_s": round(s.n_queries / wall, 1),
        **mem.record(),
        "index": {
            "seconds": round(t_index, 2),
            "vectors_per_s": round(n / t_index, 1),
            **mem_index.record(),
        },
    }


def _raw_match_rate(pairs, manifest, cfg, threads: int, limit: int = 300) -> dict:
    """The matcher call alone on features in memory, with the pool's thread count, over
    (up to ``limit`` of) the same pairs grouped by query as the actors do."""
    import cv2
    import torch

    from reid_ray.rerank.features import build_extractor, load_prepared
    from reid_ray.rerank.matchers import PairScorer

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    rows = {r["image_id"]: r for r in manifest.table.to_pylist()}
    extractor, scorer = build_extractor(cfg), PairScorer(cfg)
    by_query: dict[str, list[str]] = {}
    for q, g in pairs[:limit]:
        by_query.setdefault(q, []).append(g)
    feats = {}
    for q, gs in by_query.items():
        for i in [q, *gs]:
            if i not in feats:
                feats[i] = extractor.extract(*load_prepared(rows[i], cfg))
    q0, g0 = next(iter(by_query.items()))
    scorer.score(feats[q0], [feats[g] for g in g0])  # warm-up
    seconds, n = 0.0, 0
    for q, gs in by_query.items():
        for start in range(0, len(gs), cfg.batch_size):
            chunk = [feats[g] for g in gs[start : start + cfg.batch_size]]
            t0 = time.perf_counter()
            scorer.score(feats[q], chunk)
            seconds += time.perf_counter() - t0
            n += len(chunk)
    return {
        "pairs": n,
        "threads": threads,
        "pairs_per_s": round(n / seconds, 2),
        "mean_keypoints": round(sum(len(f) for f in feats.values()) / len(feats), 1),
    }


def stage_rerank(n_pairs: int, work: str) -> dict:
    import numpy as np
    import pyarrow as pa

    from reid_ray.data import read_manifest
    from reid_ray.rerank import RerankConfig, rerank_candidates
    from reid_ray.rerank.fusion import fit_fusion

    n_queries = max(1, n_pairs // CANDIDATES)
    n_images = (n_queries + 1) * PER_ID
    manifest = read_manifest(sub_manifest(os.path.join(work, "images", "all.csv"), n_images))
    ids = manifest.table["image_id"].to_pylist()
    # each query's candidates: its own identity (real matches to verify) and the next one;
    # extraction (per image) and matching (per pair) both grow 10x
    pairs = [
        (ids[PER_ID * q], ids[PER_ID * (q + c // (PER_ID - 1)) + 1 + c % (PER_ID - 1)])
        for q in range(n_queries)
        for c in range(CANDIDATES)
    ]
    table = pa.table(
        {
            "query_id": [q for q, _ in pairs],
            "gallery_id": [g for _, g in pairs],
            "score": np.tile(np.linspace(0.9, 0.1, CANDIDATES), n_queries),
        }
    )
    cfg = RerankConfig(
        extractor="sift",
        matcher="classical",
        max_keypoints=128,
        resize_long_side=128,
        top_k=CANDIDATES,
        batch_size=CANDIDATES,
        device="cpu",
    )
    same = np.arange(40) % 4 == 0
    fusion = fit_fusion(np.linspace(0, 1, 40) + same, np.arange(40.0) + 50 * same, same)
    with PeakRss() as mem:
        t0 = time.perf_counter()
        res = rerank_candidates(
            table, manifest, cfg, os.path.join(work, f"rr-{n_pairs}"), fusion=fusion, overwrite=True
        )
        wall = time.perf_counter() - t0
    st = res.stats.get("scoring", {})
    scored = int(res.ranked.column("local_score").null_count)
    rec = {
        "pairs": len(pairs),
        "queries": n_queries,
        "images": n_images,
        "pairs_unscored": scored,
        "pairs_with_matches": int(
            sum(1 for v in res.ranked.column("local_score").to_pylist() if v and v > 0)
        ),
        "errors": res.errors.num_rows,
        "seconds": round(wall, 2),
        "pairs_per_s": round(len(pairs) / wall, 1),
        "match_stage_pairs_per_s": st.get("pairs_per_s"),
        "match_pairs_per_actor_s": st.get("pairs_per_actor_s"),
        "pool": st.get("pool"),
        **mem.record(),
    }
    threads = int((st.get("pool") or {}).get("threads") or 1)
    try:
        raw = _raw_match_rate(pairs, manifest, cfg, threads)
        rec["raw_matcher"] = raw
        for key, name in (
            ("match_stage_pairs_per_s", "match_stage_vs_raw"),
            ("match_pairs_per_actor_s", "actor_seconds_vs_raw"),
        ):
            if rec[key]:
                rec[name] = round(rec[key] / raw["pairs_per_s"], 3)
    except Exception as e:  # the kernels' API may move; the pipeline figures still count
        rec["raw_matcher"] = {"error": f"{type(e).__name__}: {e}"}
    return rec


def stage_train(n: int, work: str) -> dict:
    from reid_ray.train import TrainConfig, train

    manifest = sub_manifest(os.path.join(work, "images", "all.csv"), n)
    cfg = TrainConfig(
        model=MODEL,
        image_size=32,
        embedding_dim=64,
        epochs=1,
        workers=2,
        batch_size=16,
        calibration_fraction=0.0,
        decoded_cache_mb=0,
    )
    with PeakRss() as mem:
        t0 = time.perf_counter()
        summary = train(manifest, os.path.join(work, f"train-{n}"), config=cfg, resume=False)
        wall = time.perf_counter() - t0
    epoch_s = summary.get("mean_epoch_s")
    return {
        "images": n,
        "seconds": round(wall, 2),
        "images_per_s": round(n / wall, 1),
        "epoch_seconds": epoch_s,
        "images_per_epoch_s": round(n / epoch_s, 1) if epoch_s else None,
        **mem.record(),
    }


def run_child(stage: str, n: int, work: str, result: str) -> None:
    import ray

    from reid_ray.console import route_ray_logs
    from reid_ray.runtime import configure_data_context

    load_before = os.getloadavg()
    # address="local": a cluster of our own even when another one on this machine left its
    # address in /tmp/ray/ray_current_cluster (ray.init() without an address joins that)
    route_ray_logs(os.path.join(work, f"ray-{stage}-{n}.log"))
    ray.init(
        address="local",
        # search: 8 logical CPUs, so that the searcher pool leaves a whole CPU to the
        # read_parquet tasks (below 8 CPUs it leaves 0.5 and the reads never schedule)
        num_cpus=max(8, os.cpu_count() or 1) if stage == "search" else os.cpu_count(),
        object_store_memory=400 * 1024 * 1024,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    route_ray_logs(None)
    configure_data_context()
    rec = globals()[f"stage_{stage}"](n, work)
    rec["load_average"] = {
        "before": [round(x, 2) for x in load_before],
        "after": [round(x, 2) for x in os.getloadavg()],
    }
    Path(result).write_text(json.dumps(rec, default=str))


# -- the parent ----------------------------------------------------------------------------


def _ratio(a, b):
    return round(b / a, 3) if a and b is not None else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller pair of sizes")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--out", default=None)
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument(
        "--child", nargs=4, metavar=("STAGE", "N", "WORK", "RESULT"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.child:
        stage, n, work, result = args.child
        run_child(stage, int(n), work, result)
        return {}

    sizes = SIZES["quick" if args.quick else "full"]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    work = tempfile.mkdtemp(prefix="rr-scale-")
    t0 = time.perf_counter()
    need = max(
        [sizes[s][1] for s in ("embed", "train") if s in stages]
        + [(sizes["rerank"][1] // CANDIDATES + 1) * PER_ID] * ("rerank" in stages)
        + [1]
    )
    make_images(os.path.join(work, "images"), need)
    logger.info("generated %d images in %.1fs", need, time.perf_counter() - t0)
    report_stages = {}
    for stage in stages:
        runs = {}
        for label, n in zip(("1x", "10x"), sizes[stage], strict=True):
            result = os.path.join(work, f"result-{stage}-{n}.json")
            env = dict(os.environ)
            if stage == "rerank":  # the thread settings of a Ray worker, for the raw matcher
                env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
            logger.info("%s at %d ...", stage, n)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", stage, str(n), work, result],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0 or not os.path.exists(result):
                runs[label] = {"size": n, "error": proc.stderr[-3000:]}
                logger.error("%s at %d failed:\n%s", stage, n, proc.stderr[-3000:])
                continue
            runs[label] = {"size": n, **json.loads(Path(result).read_text())}
            logger.info("%s at %d: %s", stage, n, runs[label])
        a, b = runs.get("1x", {}), runs.get("10x", {})
        entry = {"runs": runs}
        entry["peak_rss_ratio"] = _ratio(a.get("peak_rss_mb"), b.get("peak_rss_mb"))
        entry["growth_ratio"] = _ratio(a.get("growth_mb"), b.get("growth_mb"))
        entry["meets_target"] = (
            entry["peak_rss_ratio"] is not None and entry["peak_rss_ratio"] <= TARGET
        )
        if stage == "search":
            entry["index_peak_rss_ratio"] = _ratio(
                (a.get("index") or {}).get("peak_rss_mb"), (b.get("index") or {}).get("peak_rss_mb")
            )
        report_stages[stage] = entry
    import torch

    report = {
        "benchmark": "scale",
        "target": f"peak driver RSS at 10x the work <= {TARGET}x (issue 13)",
        "how": "each (stage, size) in a fresh child process with its own local Ray cluster; "
        "driver RSS sampled every 20 ms by a thread around the stage call (Ray workers not "
        "counted); growth = peak - RSS just before the call",
        "quick": args.quick,
        "sizes": {s: sizes[s] for s in stages},
        "model": MODEL,
        "stages": report_stages,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "torch": torch.__version__,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = args.out or str(RESULTS / ("scale_quick.json" if args.quick else "scale.json"))
    from reid_ray import io as rio

    rio.write_json_atomic(out, report)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("wrote %s (%.0fs)", out, report["seconds"])
    return report


if __name__ == "__main__":
    main()
