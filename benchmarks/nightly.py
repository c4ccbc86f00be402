"""Seconds per 1,000 new images of the nightly job, by stage, against two gallery sizes.

One run, side by side on this machine and one local Ray cluster:

1. a toy zoo of real JPEG files (``generate_zoo``): the *gallery* images (labelled) and
   the *night*'s new images (``--new``, default 1000: other images of gallery individuals
   and individuals the gallery has never seen);
2. a gallery of ``--small`` images (default 2000): the zoo's gallery images embedded
   for real (``gallery build``);
3. a gallery of ``--large`` images (default 20000): the same version plus synthetic
   individuals of 4 vectors each (a centre near a real gallery vector, its images near the
   centre; Gaussian noise) written as a merged version. Embedding 20k more images would only measure embedding again: the
   stages that depend on the gallery's size (index load, search, decide, group, and the
   index build + calibration of a merge) see vectors only;
4. ``identify`` of the night against each gallery, each into a fresh output folder so
   both embed the night from scratch; then ``gallery merge`` of the night into each.
5. with ``--rerank``: ``identify`` of the same night against the small gallery again with
   local-feature re-ranking (``rerank.enabled``; ``--rerank-config``, default SIFT + the
   classical matcher, no weights), reusing the night's embeddings (a copy of the first
   run's embed output: the embed stage resumes with nothing to do), before the merge. The
   large gallery cannot be re-ranked: its synthetic vectors have no image files.

Reports wall seconds per stage (as ``identify`` times them) and per 1,000 new images, with
the decision accuracy the run measured (the zoo's labels, read only for evaluation).

    python benchmarks/nightly.py [--new 1000 --small 2000 --large 20000 --size 32]
        [--image-size 32] [--rerank [--rerank-config rerank.yaml]]

Writes ``benchmarks/results/nightly.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_RESULT = HERE / "results" / "nightly.json"
# SIFT + MAGSAC: no weights, ~20 ms per image and a few ms per pair on a CPU (docs/design.md)
DEFAULT_RERANK = {"extractor": "sift", "matcher": "classical", "max_keypoints": 512,
                  "resize_long_side": 384}  # fmt: skip


def _zoo(root: Path, n_gallery: int, n_new: int, size: int, per: int, seed: int):
    """Write the zoo; returns (gallery manifest, night manifest)."""
    import pandas as pd

    from reid_ray.synth import generate_zoo

    g_ids = max(2, n_gallery // per)
    unseen = max(2, n_new // (2 * per))
    known_extra = n_new - unseen * per  # night images of gallery individuals
    extra_per = max(1, -(-known_extra // g_ids))
    total_ids = g_ids + unseen
    images_per = per + extra_per
    generate_zoo(str(root / "zoo"), species=3, individuals=total_ids, images_per=images_per,
                 size=size, seed=seed)  # fmt: skip
    meta = pd.read_csv(root / "zoo" / "metadata.csv")
    meta["path"] = [str(root / "zoo" / p) for p in meta["path"]]
    meta["j"] = meta.groupby("identity").cumcount()
    ids = sorted(meta.identity.unique())
    gallery_ids, new_ids = ids[:g_ids], ids[g_ids:]
    gallery = meta[meta.identity.isin(gallery_ids) & (meta.j < per)].head(n_gallery)
    known = meta[meta.identity.isin(gallery_ids) & (meta.j >= per)].head(known_extra)
    night = pd.concat([known, meta[meta.identity.isin(new_ids)].head(n_new - len(known))])
    # the crop boxes travel with the images: a model sees the animal, not the whole scene
    cols = [c for c in ("image_id", "path", "identity", "species", "bbox", "date") if c in meta]
    gallery[cols].to_csv(root / "gallery.csv", index=False)
    night[cols].to_csv(root / "night.csv", index=False)
    return root / "gallery.csv", root / "night.csv", len(gallery), len(night)


def _grow(gallery: str, n_total: int, seed: int, cfg) -> float:
    """Add synthetic vectors to reach ``n_total`` images (one merged version); seconds."""
    import numpy as np

    from reid_ray.gallery.build import calibrator
    from reid_ray.gallery.store import gallery_table, open_version, read_table, write_version

    t = time.perf_counter()
    v = open_version(gallery)
    base = read_table(v, ["embedding"]).column("embedding").to_pylist()
    base = np.asarray(base, dtype=np.float32)
    n_add = n_total - len(base)
    rng = np.random.default_rng(seed)
    d = base.shape[1]
    # synthetic individuals of 4 images: a centre near a real vector, images near the centre
    n_ids = -(-n_add // 4)
    centres = base[rng.integers(0, len(base), n_ids)] + 0.8 / np.sqrt(d) * rng.normal(
        size=(n_ids, d)
    )
    x = np.repeat(centres, 4, axis=0)[:n_add] + 0.3 / np.sqrt(d) * rng.normal(size=(n_add, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"synthetic-{i:06d}" for i in range(n_add)]
    rows = gallery_table(ids, [f"synthetic-id-{i // 4:05d}" for i in range(n_add)], x, v.key,
                         [None] * n_add, "", "benchmark")  # fmt: skip
    write_version(gallery, rows, parent=v, model=v.info["model"],
                  calibrate=calibrator(cfg, v.info["model"]["ref"]), operation="merge",
                  merged=[{"results": "synthetic", "added": n_add}])  # fmt: skip
    return time.perf_counter() - t


def _run_record(report, timings, size, merged=None) -> dict:
    per_1000 = {k: v * 1000.0 / max(1, report["counts"]["identified"])
                for k, v in timings.items()}  # fmt: skip
    out = {
        "gallery_images": size,
        "counts": report["counts"],
        "decision": report.get("decision"),
        "seconds": timings,
        "seconds_per_1000_new_images": per_1000,
        "evaluation": report.get("evaluation"),
    }
    if merged is not None:
        out["merge"] = {k: merged[k] for k in ("version", "added")}
    if "rerank" in report:
        out["rerank"] = report["rerank"]
    return out


def _accuracy(run: dict) -> dict:
    ev = run.get("evaluation") or {}
    keys = ("decision_accuracy", "known_identified", "new_detected")
    return {k: ev.get(k) for k in keys} | {
        "known": run["counts"]["known"],
        "new": run["counts"]["new"],
        "seconds_per_1000_new_images": run["seconds_per_1000_new_images"]["total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new", type=int, default=1000)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--size", type=int, default=32, help="zoo image side (px)")
    parser.add_argument("--image-size", type=int, default=32, help="model input side (px)")
    parser.add_argument("--per", type=int, default=4, help="gallery images per individual")
    parser.add_argument("--model", default="timm:efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", default=str(DEFAULT_RESULT))
    parser.add_argument("--workdir", default=None, help="kept when given, else a temp folder")
    parser.add_argument("--rerank", action="store_true",
                        help="also identify against the small gallery with re-ranking")  # fmt: skip
    parser.add_argument("--rerank-config", default=None,
                        help="rerank YAML (default: SIFT + classical matcher)")  # fmt: skip
    args = parser.parse_args()
    load_at_start = os.getloadavg()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")  # a busy machine
    import ray

    from reid_ray.gallery import build_gallery, identify, load_nightly_config, merge_results
    from reid_ray.runtime import configure_data_context

    root = Path(args.workdir or tempfile.mkdtemp(prefix="rr-nightly-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_nightly_config({"embed": {"image_size": args.image_size}, "night": "bench"})
    t = time.perf_counter()
    g_csv, n_csv, n_gallery, n_new = _zoo(root, args.small, args.new, args.size, args.per,
                                          args.seed)  # fmt: skip
    zoo_seconds = time.perf_counter() - t
    # a cluster of its own (address="local"), even when `ray start` runs on this machine
    ray.init(address="local", num_cpus=args.cpus, object_store_memory=400 * 1024 * 1024,
             include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)  # fmt: skip
    configure_data_context()
    small = str(root / "G-small")
    t = time.perf_counter()
    build = build_gallery(str(g_csv), args.model, small, cfg)
    build_seconds = time.perf_counter() - t
    large = str(root / "G-large")
    shutil.copytree(small, large)
    grow_seconds = _grow(large, args.large, args.seed, cfg)

    rerank_cfg = None
    if args.rerank:
        import yaml

        rerank_yaml = args.rerank_config or str(root / "rerank.yaml")
        if not args.rerank_config:
            Path(rerank_yaml).write_text(yaml.safe_dump(DEFAULT_RERANK))
        rerank_cfg = load_nightly_config(
            {"embed": {"image_size": args.image_size}, "night": "bench",
             "rerank": {"enabled": True, "config": rerank_yaml}}
        )  # fmt: skip

    runs = {}
    for name, gallery in (("small", small), ("large", large)):
        from reid_ray.gallery import open_version

        size = open_version(gallery).info["counts"]["images"]
        out = str(root / f"night-{name}")
        report = identify(gallery, str(n_csv), out, cfg)
        if rerank_cfg is not None and name == "small":  # before the merge adds the night
            out_rr = str(root / "night-small-rerank")
            shutil.copytree(Path(out) / "embed", Path(out_rr) / "embed")
            report_rr = identify(gallery, str(n_csv), out_rr, rerank_cfg)
            runs["small_rerank"] = _run_record(report_rr, dict(report_rr["timings"]), size)
        t = time.perf_counter()
        merged = merge_results(gallery, out, cfg)
        merge_seconds = time.perf_counter() - t
        timings = dict(report["timings"], merge=merge_seconds)
        runs[name] = _run_record(report, timings, size, merged)
        per_1000 = runs[name]["seconds_per_1000_new_images"]
        print(f"{name}: gallery {size}, {report['counts']['identified']} new images, "
              f"{per_1000['total']:.1f} s per 1000 (+ merge {per_1000['merge']:.1f})")  # fmt: skip
    comparison = None
    if "small_rerank" in runs:
        with_rr = runs["small_rerank"]
        # the re-ranked run reused the night's embeddings: add the first run's embed time
        embed = runs["small"]["seconds_per_1000_new_images"]["embed"]
        total_rr = with_rr["seconds_per_1000_new_images"]["total"]
        comparison = {
            "gallery": "small",
            "without_rerank": _accuracy(runs["small"]),
            "with_rerank": _accuracy(with_rr)
            | {"seconds_per_1000_new_images_with_embed": total_rr + embed},
            "rerank_config": rerank_cfg.rerank.config,
            "measures": (
                "decision_accuracy over the night's labelled images (known-vs-new right), "
                "known_identified, new_detected, from identify's evaluation block; the "
                "re-ranked run's seconds exclude embedding (reused), the _with_embed figure "
                "adds the plain run's embed seconds"
            ),
        }
        print(f"decision accuracy: without re-ranking "
              f"{comparison['without_rerank']['decision_accuracy']}, with "
              f"{comparison['with_rerank']['decision_accuracy']}")  # fmt: skip
    result = {
        "benchmark": "benchmarks/nightly.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus_os": os.cpu_count(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg(),
        },  # fmt: skip
        "setup": {
            "zoo_seconds": zoo_seconds,
            "gallery_build_seconds": build_seconds,
            "gallery_build": build["counts"],
            "large_gallery_grow_seconds": grow_seconds,
            "night_images": n_new,
            "gallery_real_images": n_gallery,
        },
        "runs": runs,
        "rerank_comparison": comparison,
        "measures": (
            "wall seconds of each identify stage (load_gallery, embed = decode + model on the "
            "actor pool, search = FAISS on the searcher pool, decide, group, write) and of the "
            "merge (new part + index build + leave-identity-out calibration), on a local Ray "
            "cluster of --cpus CPUs on this machine (shared, see load_avg_at_end); per 1000 = "
            "seconds x 1000 / images identified. The large gallery holds the small one's "
            "real vectors plus synthetic ones (see the module docstring)."
        ),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
