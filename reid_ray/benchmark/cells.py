"""One benchmark cell (a dataset x a method): train if the method trains, then the benchmark
protocol of ``reid_ray.evaluation.evaluate``, on the whole dataset and per species.

Work is shared between cells, never redone: a model's embeddings of a dataset live in
``OUT/work/<dataset>/embed/<model key>`` (the cells with and without re-ranking and every
species split use them, so each image is embedded once), local features in
``OUT/work/<dataset>/features``
(once per image for every re-ranking cell), a fine-tuned checkpoint in
``OUT/work/<dataset>/train/<settings key>`` (fine-tune and fine-tune + re-ranking share it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

from reid_ray import io as rio
from reid_ray.benchmark.config import BenchmarkConfig, MethodSpec
from reid_ray.benchmark.datasets import PreparedDataset, species_slug

logger = logging.getLogger(__name__)

ALL = "all"  # the species label of a whole-dataset evaluation
METRIC_KEYS = ("top1", "top5", "top20", "mAP", "baks", "baus", "threshold")


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def model_key(ref: str, image_size: int | None) -> str:
    """A folder name for a model: readable and unique (a hash of the full reference)."""
    tail = re.sub(r"[^A-Za-z0-9_.+-]+", "_", ref.rstrip("/").split("/")[-1])[-40:]
    return f"{tail}-{image_size or 'auto'}-{short_hash([ref, image_size])}"


def evaluate_one(
    ds: PreparedDataset, split: str, model: str, work: str, method: MethodSpec,
    image_size: int | None, k: int, species: str = ALL,
) -> dict[str, Any]:  # fmt: skip
    """``evaluate`` one model on one split; the cell's summary of its metrics.json.

    The model's embeddings of the dataset live in one folder, ``work/embed/<model key>``,
    shared by every cell and species split (each image embedded once); local features in
    ``work/features`` (once per image for every re-ranking cell); each evaluation writes its
    candidates and metrics to ``work/eval/<model key>/<method>.<species>``.
    """
    from reid_ray.config import load_config
    from reid_ray.evaluation import evaluate
    from reid_ray.rerank import RerankConfig

    key = model_key(model, image_size)
    rerank = None
    if method.rerank is not None:
        rerank = load_config(RerankConfig, {"cache_dir": rio.join(work, "features"),
                                            **method.rerank})  # fmt: skip
    eval_dir = rio.join(work, "eval", key, f"{method.name}.{species_slug(species)}")
    t = time.perf_counter()
    metrics = evaluate(
        ds.manifest, split, model, eval_dir, rerank=rerank, image_size=image_size, k=k,
        embed_dir=rio.join(work, "embed", key), command=f"benchmark {ds.name} {method.name}",
    )  # fmt: skip
    seconds = time.perf_counter() - t
    counts = metrics.get("counts", {})
    timings = dict(metrics.get("timings", {}))
    if metrics.get("rerank"):
        timings["rerank_seconds"] = metrics["rerank"].get("seconds")
    out = {key: metrics.get(key) for key in METRIC_KEYS}
    out.update(
        auroc=metrics.get("auroc_known_unknown"),
        seconds=round(seconds, 2),
        timings=timings,
        counts={
            key: counts.get(key)
            for key in (
                "query_rows",
                "gallery_rows",
                "query_unknown_rows",
                "gallery_identities",
                "embed_errors",
            )
        },  # fmt: skip
        model=metrics.get("model", {}).get("description"),
        eval_dir=eval_dir,
    )
    if "global" in metrics:
        g = metrics["global"]
        out["global"] = {key: g.get(key) for key in (*METRIC_KEYS, "auroc_known_unknown")}
    return out


def train_one(ds: PreparedDataset, split: str, method: MethodSpec, train_dir: str) -> dict:
    """Fine-tune ``method.model`` on the split's train rows (resumes; a finished run is
    reused); the training summary."""
    from reid_ray.config import load_config
    from reid_ray.train import TrainConfig, train

    settings = {"model": method.model, **method.train}
    if method.image_size is not None:
        settings.setdefault("image_size", method.image_size)
    cfg = load_config(TrainConfig, settings)
    t = time.perf_counter()
    summary = train(ds.manifest, train_dir, split_path=split, config=cfg)
    timings = dict(summary.get("timings", {}))
    timings["wall_s"] = round(time.perf_counter() - t, 2)
    return {
        "checkpoint": train_dir,
        "epochs": summary.get("epochs_completed"),
        "best_epoch": summary.get("best_epoch"),
        "best_val_mAP": summary.get("best_val_mAP"),
        "train_images": summary.get("counts", {}).get("train_images"),
        "train_identities": summary.get("counts", {}).get("train_identities"),
        "reused": bool(summary.get("skipped")),
        "timings": timings,
    }


def _targets(ds: PreparedDataset, by_species: bool) -> list[tuple[str, str]]:
    """(species label, split file) pairs a cell is evaluated on."""
    targets = [(ALL, ds.split)]
    if by_species:
        targets += sorted(ds.species_splits.items())
    return targets


def run_cell(ds: PreparedDataset, method: MethodSpec, cfg: BenchmarkConfig,
             budget: float | str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run one cell; ``{"results": {species: summary}, "train": ..., "seconds": ...}``."""
    work = rio.join(cfg.out, "work", ds.name)
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    training: dict[str, Any] = {}
    if method.kind in ("pretrained", "checkpoint"):
        for sp, split in _targets(ds, cfg.by_species):
            results[sp] = evaluate_one(ds, split, method.model, work, method, method.image_size,
                                       cfg.k, sp)  # fmt: skip
    elif method.kind == "finetune":
        tkey = short_hash([method.model, method.image_size, method.train])
        if method.per_species:
            plan = [(sp, split, rio.join(work, "train", f"{tkey}.{species_slug(sp)}"))
                    for sp, split in sorted(ds.species_splits.items())]  # fmt: skip
            if not plan:  # a single-species dataset: per-species is the one model
                plan = [(ALL, ds.split, rio.join(work, "train", tkey))]
            for sp, split, train_dir in plan:
                training[sp] = train_one(ds, split, method, train_dir)
                results[sp] = evaluate_one(ds, split, train_dir, work, method, None, cfg.k, sp)
        else:
            train_dir = rio.join(work, "train", tkey)
            training[ALL] = train_one(ds, ds.split, method, train_dir)
            for sp, split in _targets(ds, cfg.by_species):
                results[sp] = evaluate_one(ds, split, train_dir, work, method, None, cfg.k, sp)
    else:
        from reid_ray.benchmark.active import run_active_cell

        results, training = run_active_cell(ds, method, cfg, budget, work)
    return {"results": results, "train": training, "seconds": round(time.perf_counter() - t0, 2)}
