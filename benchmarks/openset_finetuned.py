"""Known vs new with a model fine-tuned on the gallery (issue 14): global only vs SIFT re-ranking.

The common deployment: fine-tune on the labelled catalogue, then ask of every new image
"known or new?". For one dataset (manifest + split file with train/val/gallery/query/
query_unknown rows) this

1. writes a derived split in which the GALLERY rows are the ``train`` rows and the ``val``
   rows stay ``val`` (a row has one split: the original train rows are not used);
2. trains on it with ``reid_ray.train.train`` (what ``reid-ray train`` runs); training
   keeps whole gallery identities out for calibration (``calibration_fraction``), which the
   known-vs-new decision is then fitted on;
3. evaluates the checkpoint on the ORIGINAL split with ``reid_ray.evaluation.evaluate``
   (what ``reid-ray evaluate`` runs), global only and with ``--rerank`` (SIFT + classical
   matcher), both sharing one embeddings folder;

4. evaluates again with re-ranking and the decision forced onto the fused probability
   (``--set decision gate=fused``: what every re-ranked decision did before the ``decide``
   stage chose between the global and the fused score), sharing the feature cache;

and writes top-1, mAP, BAKS, BAUS, their harmonic mean, the known/unknown AUROC, the
threshold, the score that decided (``gate``), the fusion weight and its reason, seconds per
phase and the load average to ``benchmarks/results/openset_finetuned_<name>.json``.
``--no-train`` skips step 2 and evaluates ``--model`` as it is (e.g. the ImageNet start).

    reid-ray synth --out /tmp/zoo --species 3 --individuals 90 --images-per 10 --size 256
    python benchmarks/openset_finetuned.py --name toyzoo --manifest /tmp/zoo/metadata.csv \\
        --split /tmp/zoo/split.csv --work /tmp/of-zoo --image-size 128 --epochs 12 \\
        --rerank-top-k 10 --resize-long-side 256
    python benchmarks/openset_finetuned.py --name dogfacenet \\
        --manifest /work/data/dogfacenet/metadata.csv --split /work/data/dogfacenet/split.csv \\
        --work /tmp/of-dog --image-size 160 --epochs 5 --rerank-top-k 10 --resize-long-side 384
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("openset_finetuned")
KEYS = ("top1", "top5", "mAP", "baks", "baus", "threshold", "auroc_known_unknown")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _hmean(a, b) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def derive_split(split_path: str, out_path: Path) -> dict[str, int]:
    """Gallery rows -> ``train``, ``val`` rows kept; every other row unused."""
    from reid_ray.data.splits import read_split, write_split

    split = read_split(split_path)
    derived = split[split["split"].isin(["gallery", "val"])].copy()
    derived.loc[derived["split"] == "gallery", "split"] = "train"
    write_split(derived, str(out_path))
    return {k: int(v) for k, v in derived["split"].value_counts().items()}


def _row(m: dict) -> dict:
    row = {k: m.get(k) for k in KEYS}
    row["hmean_baks_baus"] = _hmean(m.get("baks"), m.get("baus"))
    dec = m.get("open_set") or {}
    row["gate"] = dec.get("gate")
    row["decision"] = {k: v for k, v in dec.items() if k != "method"}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="Dataset name (the result file's suffix).")
    p.add_argument("--manifest", required=True)
    p.add_argument("--split", required=True, help="Split with gallery/query/query_unknown/val.")
    p.add_argument("--work", required=True, help="Scratch folder (checkpoint, evaluations).")
    p.add_argument("--model", default="timm:efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--calibration-fraction", type=float, default=None,
                   help="Held-out calibration identities (default: TrainConfig's).")  # fmt: skip
    p.add_argument("--rerank-top-k", type=int, default=10)
    p.add_argument("--resize-long-side", type=int, default=256)
    p.add_argument("--calibration-queries", type=int, default=None,
                   help="Gallery queries the re-ranking calibrates on (default: RerankConfig's).")  # fmt: skip
    p.add_argument("--result", default=None, help="Result JSON (default benchmarks/results/).")
    p.add_argument("--no-train", action="store_true", help="Evaluate --model as it is.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from reid_ray.decide import DecisionConfig
    from reid_ray.evaluation import evaluate
    from reid_ray.rerank import load_rerank_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result_path = Path(args.result or HERE / "results" / f"openset_finetuned_{args.name}.json")
    record: dict = {
        "command": "python benchmarks/openset_finetuned.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "load_start": _load(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": {},
        "load_after": {},
    }

    def phase(name: str, t0: float) -> None:
        record["seconds"][name] = round(time.perf_counter() - t0, 1)
        record["load_after"][name] = _load()
        LOG.info("%s: %.1f s, load %s", name, record["seconds"][name], record["load_after"][name])

    t = time.perf_counter()
    if args.no_train:
        checkpoint, record["train"] = args.model, None
    else:
        checkpoint = _train(args, work, record)
        phase("train", t)
    embed_dir = str(work / "embed")
    size = {"image_size": args.image_size} if args.no_train else {}

    t = time.perf_counter()
    # the checkpoint keeps its own input size and preprocessing
    glob = evaluate(args.manifest, args.split, checkpoint, str(work / "eval_global"),
                    embed_dir=embed_dir, **size)  # fmt: skip
    phase("evaluate_global", t)
    rcfg = load_rerank_config(
        dict(extractor="sift", matcher="classical", top_k=args.rerank_top_k,
             resize_long_side=args.resize_long_side, cache_dir=str(work / "features")),
        calibration_queries=args.calibration_queries,
    )  # fmt: skip
    t = time.perf_counter()
    rer = evaluate(args.manifest, args.split, checkpoint, str(work / f"eval_rerank_{args.name}"),
                   rerank=rcfg, embed_dir=embed_dir, **size)  # fmt: skip
    phase("evaluate_rerank", t)
    t = time.perf_counter()
    fused = evaluate(args.manifest, args.split, checkpoint, str(work / "eval_rerank_fused_gate"),
                     rerank=rcfg, embed_dir=embed_dir, decision=DecisionConfig(gate="fused"),
                     **size)  # fmt: skip
    phase("evaluate_rerank_fused_gate", t)
    _write(args, record, result_path, glob, rer, fused)
    return 0


def _train(args, work: Path, record: dict) -> str:
    """Step 2: fine-tune on the gallery rows; returns the checkpoint folder."""
    from reid_ray.config import replace
    from reid_ray.train import TrainConfig, train

    train_split = work / "train_on_gallery_split.csv"
    record["train_split_rows"] = derive_split(args.split, train_split)
    cfg = replace(
        TrainConfig(), model=args.model, image_size=args.image_size, epochs=args.epochs,
        workers=args.workers, batch_size=args.batch_size,
        calibration_fraction=args.calibration_fraction,
    )  # fmt: skip
    summary = train(args.manifest, str(work / "train"), split_path=str(train_split), config=cfg)
    c = summary["counts"]
    record["train"] = {
        "config": cfg.to_dict(),
        "train_images": c["train_images"],
        "train_identities": c["train_identities"],
        "calibration_identities": c.get("calibration_identities"),
        "calibration_images": c.get("calibration_images"),
        "val_images": c["val_images"],
        "epochs_completed": summary["epochs_completed"],
        "best_epoch": summary["best_epoch"],
        "val_mAP": summary["val_mAP"],
        "skipped_already_complete": bool(summary.get("skipped")),
    }
    return str(work / "train")


def _write(args, record: dict, result_path: Path, glob: dict, rer: dict, fused: dict) -> None:
    info = rer.get("rerank") or {}
    stats = info.get("stats") or {}
    record.update(
        {
            "dataset": dict(
                name=args.name, manifest=args.manifest, split=args.split, counts=glob["counts"]
            ),  # fmt: skip
            "model": glob["model"],
            "global": _row(glob),
            "rerank": _row(rer),
            "rerank_fused_gate": _row(fused),
            "global_inside_rerank_run": _row(rer.get("global") or {}),
            "rerank_config": info and rer["config"]["rerank"],
            "fusion_weight": info.get("fusion_weight"),
            "fusion_weight_reason": stats.get("weight_reason"),
            "rerank_stats": stats,
            "load_end": _load(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    for name in ("global", "rerank", "rerank_fused_gate"):
        r = record[name]
        LOG.info(
            "%s: top1 %s mAP %s BAKS %s BAUS %s hmean %s AUROC %s", name, r["top1"], r["mAP"],
            r["baks"], r["baus"], r["hmean_baks_baus"], r["auroc_known_unknown"],
        )  # fmt: skip
    LOG.info("wrote %s", result_path)


if __name__ == "__main__":
    raise SystemExit(main())
