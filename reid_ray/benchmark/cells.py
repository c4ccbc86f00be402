"""One benchmark cell (a dataset x a method): train if the method trains, then the benchmark
protocol of ``reid_ray.evaluation.evaluate``, on the whole dataset and per species.

Work is shared between cells, never redone: a model's embeddings of a dataset live in
``OUT/work/<dataset>/eval/<model key>`` (the cells with and without re-ranking use the same
folder, so the images are embedded once), local features in ``OUT/work/<dataset>/features``
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

import numpy as np

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


def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float | None:
    """P(a known query's top score > an unknown query's), ties counted half (the
    Mann-Whitney form of the ROC AUC); None without both kinds of query."""
    from scipy.stats import rankdata

    k = np.asarray(known_scores, dtype=np.float64)
    u = np.asarray(unknown_scores, dtype=np.float64)
    if len(k) == 0 or len(u) == 0:
        return None
    ranks = rankdata(np.concatenate([k, u]))
    return float((ranks[: len(k)].sum() - len(k) * (len(k) + 1) / 2) / (len(k) * len(u)))


def _top_scores(table, score_col: str) -> dict[str, float]:
    frame = table.select(["query_id", score_col]).to_pandas()
    return frame.groupby("query_id")[score_col].max().astype(float).to_dict()


def open_set_auroc(top: dict[str, float], split_path: str) -> float | None:
    """AUROC of the top-1 score as a known-vs-new detector over query + query_unknown rows
    (a query without candidates scores -inf)."""
    from reid_ray.data import read_split

    split = read_split(split_path)
    scores = {
        s: np.array([top.get(i, -np.inf) for i in split.loc[split["split"] == s, "image_id"]])
        for s in ("query", "query_unknown")
    }
    return auroc(scores["query"], scores["query_unknown"])


class RerankHook:
    """The re-ranking callable handed to ``evaluate``: our settings, our output folder (one
    per settings, beside the shared embeddings), and the re-ranked table kept for AUROC."""

    def __init__(self, settings: dict[str, Any], out_dir: str, cache_dir: str):
        from reid_ray.config import load_config
        from reid_ray.rerank import RerankConfig

        self.cfg = load_config(RerankConfig, {"cache_dir": cache_dir, **settings})
        self.out_dir = out_dir
        self.reranked = None

    def __call__(self, *, cfg: Any = None, out_dir: str | None = None, **kwargs: Any):
        from reid_ray.rerank import rerank_with_calibration

        result = rerank_with_calibration(cfg=self.cfg, out_dir=self.out_dir, **kwargs)
        self.reranked = result[0]
        return result


def evaluate_one(
    ds: PreparedDataset, split: str, model: str, eval_dir: str, method: MethodSpec,
    image_size: int | None, k: int, species: str = "all",
) -> dict[str, Any]:  # fmt: skip
    """``evaluate`` one model on one split; the cell's summary of its metrics.json.

    Every split of a dataset is evaluated in the model's one ``eval_dir``: the embeddings
    there are reused (only missing images are embedded); re-ranking writes to its own folder
    per settings and species, the local features go to the dataset's shared cache.
    """
    from reid_ray.evaluation import evaluate
    from reid_ray.parts import read_parts

    hook = None
    if method.rerank is not None:
        hook = RerankHook(
            method.rerank,
            rio.join(eval_dir, f"rerank-{short_hash(method.rerank)}.{species_slug(species)}"),
            rio.join(rio.dirname(rio.dirname(eval_dir)), "features"),
        )
    t = time.perf_counter()
    metrics = evaluate(
        ds.manifest, split, model, eval_dir, rerank=hook, image_size=image_size, k=k,
        command=f"benchmark {ds.name} {method.name}",
    )  # fmt: skip
    seconds = time.perf_counter() - t
    if hook is not None and hook.reranked is not None:
        top = _top_scores(hook.reranked, "probability")
    else:
        top = _top_scores(read_parts(rio.join(eval_dir, "candidates")), "score")
    counts = metrics.get("counts", {})
    timings = dict(metrics.get("timings", {}))
    if metrics.get("rerank"):
        timings["rerank_seconds"] = metrics["rerank"].get("seconds")
    out = {key: metrics.get(key) for key in METRIC_KEYS}
    out.update(
        auroc=open_set_auroc(top, split),
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
        out["global"] = {key: g.get(key) for key in METRIC_KEYS}
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
             budget: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Run one cell; ``{"results": {species: summary}, "train": ..., "seconds": ...}``."""
    work = rio.join(cfg.out, "work", ds.name)
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    training: dict[str, Any] = {}
    if method.kind in ("pretrained", "checkpoint"):
        key = model_key(method.model, method.image_size)
        for sp, split in _targets(ds, cfg.by_species):
            results[sp] = evaluate_one(ds, split, method.model, rio.join(work, "eval", key),
                                       method, method.image_size, cfg.k, sp)  # fmt: skip
    elif method.kind == "finetune":
        tkey = short_hash([method.model, method.image_size, method.train])
        if method.per_species:
            plan = [(sp, split, rio.join(work, "train", f"{tkey}.{species_slug(sp)}"))
                    for sp, split in sorted(ds.species_splits.items())]  # fmt: skip
            if not plan:  # a single-species dataset: per-species is the one model
                plan = [(ALL, ds.split, rio.join(work, "train", tkey))]
            for sp, split, train_dir in plan:
                training[sp] = train_one(ds, split, method, train_dir)
                eval_dir = rio.join(work, "eval", model_key(train_dir, None))
                results[sp] = evaluate_one(ds, split, train_dir, eval_dir, method, None, cfg.k, sp)
        else:
            train_dir = rio.join(work, "train", tkey)
            training[ALL] = train_one(ds, ds.split, method, train_dir)
            eval_dir = rio.join(work, "eval", model_key(train_dir, None))
            for sp, split in _targets(ds, cfg.by_species):
                results[sp] = evaluate_one(ds, split, train_dir, eval_dir, method, None, cfg.k, sp)
    else:
        from reid_ray.benchmark.active import run_active_cell

        results, training = run_active_cell(ds, method, cfg, budget, work)
    return {"results": results, "train": training, "seconds": round(time.perf_counter() - t0, 2)}
