"""``reid-ray demo``: every stage on a fresh toy zoo, on a local Ray cluster, with a report.

A new user's first contact: it generates the toy zoo, evaluates an untrained and an
ImageNet model, trains with Ray Train, evaluates the checkpoint with and without local-
feature re-ranking, and writes ``report.md`` and ``metrics.json``, both led by the full
system (trained model + re-ranking + the known-vs-new decision) beside what each stage
contributes. Every figure in them is measured by this run. Each model embeds the images
once: the evaluations of one model share its embeddings folder (``OUT/embed/<model>``),
and one evaluation with re-ranking gives both its global and its re-ranked row.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, replace
from typing import Any

from reid_ray import io as rio
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPreset:
    species: int
    individuals: int
    images_per: int
    zoo_size: int  # px of the generated images
    image_size: int  # px fed to the global models
    train_backbone: str
    train_epochs: int
    train_batch: int
    rerank_top_k: int
    lightglue: bool  # also re-rank with LightGlue (slower than the classical matcher on CPU)


PRESETS = {
    "tiny": DemoPreset(2, 16, 6, 160, 64, "timm-random:resnet18", 2, 16, 5, False),
    "default": DemoPreset(3, 90, 10, 256, 128, "timm:efficientnet_lite0", 12, 16, 10, True),
    "large": DemoPreset(4, 200, 10, 256, 160, "timm:efficientnet_lite0", 16, 16, 20, True),
}

WEAK_MODEL = "timm-random:resnet18"  # random init: the weak global model re-ranking must lift
IMAGENET_MODEL = "timm:efficientnet_lite0"  # ImageNet weights, offline


@dataclass
class Row:
    """One line of the report: a stage's figures."""

    name: str
    what: str  # what the row adds to the stage before it
    model: str
    metrics: dict[str, Any]
    seconds: float


ROW_KEYS = ("top1", "top5", "mAP", "baks", "baus", "auroc_known_unknown")


def run_demo(
    out: str,
    *,
    preset: str = "default",
    seed: int = 0,
    train: bool = True,
    rerank: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns what ``metrics.json`` holds."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    p = replace(PRESETS[preset], **(overrides or {}))
    from reid_ray import console
    from reid_ray.runtime import init_ray

    t_all = time.perf_counter()
    rio.makedirs(out)
    init_ray(log_file=rio.join(out, "logs", "ray.log"))
    results: dict[str, Any] = {"full_system": None, "preset": preset, "seed": seed,
                               "config": p.__dict__, "stages": {}}  # fmt: skip
    rows: list[Row] = []
    with console.progress() as update:
        stages = _Stages(out, p, seed, update, results, rows)
        stages.zoo()
        weak_rerank = _classical(p) if rerank else None
        stages.evaluate("untrained", WEAK_MODEL, "random-init baseline", rerank=weak_rerank,
                        reranked=("untrained + SIFT re-ranking", "local features on its top-K"))  # fmt: skip
        if rerank and p.lightglue:
            stages.evaluate("untrained + LightGlue re-ranking", WEAK_MODEL,
                            "DISK + LightGlue on its top-K", rerank=_lightglue(p), only_reranked=True)  # fmt: skip
        stages.evaluate("ImageNet", IMAGENET_MODEL, "pretrained backbone")
        if train:
            checkpoint = stages.train()
            stages.evaluate("trained", checkpoint, "Ray Train fine-tuning", image_size=None,
                            rerank=weak_rerank, reranked=(FULL_SYSTEM, "re-ranking + decision"))  # fmt: skip

    full = next((r for r in rows if r.name == FULL_SYSTEM), None)
    if full is None:  # a stage was skipped: the most complete system that ran
        full = next((r for r in reversed(rows) if r.name == "trained"), rows[-1])
    results["full_system"] = _row_dict(full) | {"stage": full.name}
    results["rows"] = [_row_dict(r) for r in rows]
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    results["machine"] = _machine()
    rio.write_json_atomic(rio.join(out, "metrics.json"), results)
    report = render_report(results, rows, full, out)
    rio.write_bytes_atomic(rio.join(out, "report.md"), report.encode())
    ordered = [full] + [r for r in rows if r is not full]
    console.metrics_table(
        "measured on this run (first row: the full system)",
        ["stage", "top-1", "top-5", "mAP", "BAKS", "BAUS", "AUROC", "seconds"],
        [[r.name, *(_fmt(r.metrics.get(k)) for k in ROW_KEYS), f"{r.seconds:.0f}"]
         for r in ordered],
    )  # fmt: skip
    decision = full.metrics.get("open_set") or {}
    if decision.get("message"):
        console.console().print(f"known vs new: {decision['message']}", highlight=False)
    console.console().print(
        f"report: {rio.join(out, 'report.md')}   ({results['seconds']:.0f} s in all)",
        highlight=False,
    )
    return results


FULL_SYSTEM = "full system: trained + SIFT re-ranking + known-vs-new decision"


def _classical(p: DemoPreset):
    from reid_ray.rerank import RerankConfig

    # the zoo's crops are already large enough: no upscaling
    return RerankConfig(extractor="sift", matcher="classical", top_k=p.rerank_top_k,
                        resize_long_side=p.zoo_size)  # fmt: skip


def _lightglue(p: DemoPreset):
    from reid_ray.rerank import RerankConfig

    # LightGlue costs ~0.2-0.5 s per pair on 2 CPU cores: a shorter list keeps the demo
    # within minutes (the classical matcher re-ranks the full top-K)
    short = max(1, p.rerank_top_k // 2)
    return RerankConfig(extractor="disk", matcher="lightglue", top_k=short,
                        calibration_top_k=short, resize_long_side=p.zoo_size,
                        max_keypoints=256)  # fmt: skip


class _Stages:
    """The demo's stages; each model's embeddings live in one folder shared by its
    evaluations (``OUT/embed/<model>``)."""

    def __init__(self, out, p, seed, update, results, rows):
        self.out, self.p, self.seed, self.update = out, p, seed, update
        self.results, self.rows = results, rows
        self.zoo_summary = None

    def zoo(self) -> None:
        from reid_ray.synth import generate_zoo

        p = self.p
        self.update("toy zoo", 0, 1)
        z = generate_zoo(rio.join(self.out, "zoo"), species=p.species, individuals=p.individuals,
                         images_per=p.images_per, size=p.zoo_size, seed=self.seed)  # fmt: skip
        self.update("toy zoo", 1, 1)
        self.zoo_summary = z
        self.results["zoo"] = {"images": z.n_images, "individuals": z.n_individuals,
                               "species": z.n_species, "seconds": round(z.seconds, 2)}  # fmt: skip
        logger.info("toy zoo: %d images, %d individuals", z.n_images, z.n_individuals)

    def evaluate(self, name: str, model: str, what: str, *, image_size: Any = "preset",
                 rerank=None, reranked: tuple[str, str] | None = None,
                 only_reranked: bool = False) -> dict:  # fmt: skip
        from reid_ray import console
        from reid_ray.evaluation import evaluate

        t = time.perf_counter()
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        metrics = evaluate(
            self.zoo_summary.metadata_path, self.zoo_summary.split_path, model,
            rio.join(self.out, "eval", slug),
            image_size=self.p.image_size if image_size == "preset" else image_size,
            embed_dir=rio.join(self.out, "embed", _model_slug(model)),
            rerank=rerank, command=f"demo {name}",
            progress=console.stage_progress(self.update, f"embed {slug}"),
            rerank_progress=self.update,
        )  # fmt: skip
        seconds = time.perf_counter() - t
        self.results["stages"][slug] = {"model": model, "seconds": round(seconds, 1),
                                        "metrics": metrics}  # fmt: skip
        if rerank is None or not only_reranked:
            self._add(Row(name, what, model, metrics.get("global", metrics), seconds))
        if rerank is not None:
            label, adds = reranked or (name, what)
            self._add(Row(label, adds, model, metrics, seconds))
        return metrics

    def _add(self, row: Row) -> None:
        from reid_ray import console

        self.rows.append(row)
        figures = "  ".join(f"{k} {_fmt(row.metrics.get(k))}" for k in ROW_KEYS)
        console.console().print(f"{row.name}: {figures}", highlight=False)

    def train(self) -> str:
        from reid_ray import console
        from reid_ray.train import TrainConfig
        from reid_ray.train import train as run_train

        p = self.p
        t = time.perf_counter()
        cfg = TrainConfig(model=p.train_backbone, image_size=p.image_size, epochs=p.train_epochs,
                          workers=2, batch_size=p.train_batch, seed=self.seed)  # fmt: skip
        train_out = rio.join(self.out, "train")
        self.update("train", 0, p.train_epochs)

        def on_epoch(record: dict) -> None:
            self.update("train", int(record.get("epoch", 0)), p.train_epochs)
            console.console().print(_epoch_line(record), highlight=False)

        summary = run_train(self.zoo_summary.metadata_path, train_out,
                            split_path=self.zoo_summary.split_path, config=cfg,
                            progress=on_epoch)  # fmt: skip
        self.results["stages"]["train"] = {"seconds": round(time.perf_counter() - t, 1),
                                           "summary": summary}  # fmt: skip
        return train_out


def _model_slug(model: str) -> str:
    tail = model.rstrip("/").rsplit("/", 1)[-1] if "/" in model else model
    return "".join(c if c.isalnum() else "-" for c in tail).strip("-") or "model"


def _row_dict(r: Row) -> dict[str, Any]:
    m = r.metrics
    decision = m.get("open_set") or {}
    return {
        "stage": r.name,
        "adds": r.what,
        "model": r.model,
        **{k: m.get(k) for k in ("top1", "top5", "top20", "mAP", "baks", "baus", "threshold")},
        "auroc_known_unknown": m.get("auroc_known_unknown"),
        "open_set": {k: decision.get(k) for k in ("rule", "score", "gate", "fitted_on", "separable",
                                                  "auroc", "n_known", "n_unknown", "message")},
        "open_set_plot": m.get("open_set_plot"),
        "seconds": round(r.seconds, 1),
    }  # fmt: skip


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _epoch_line(record: dict) -> str:
    keys = [k for k in ("epoch", "train_loss", "val_mAP", "val_top1", "epoch_s") if k in record]
    return "  train " + "  ".join(f"{k} {_fmt(record[k])}" for k in keys)


def _machine() -> dict:
    import os

    import ray

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "ray_resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _relative(path: str | None, out: str) -> str | None:
    if not path:
        return None
    prefix = out.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def render_report(results: dict, rows: list[Row], full: Row, out: str = "") -> str:
    """The report: the full system first, then what each stage contributes."""
    z = results["zoo"]
    machine = results["machine"]
    lines = [
        "# reid-ray demo report",
        "",
        f"Toy zoo: {z['images']} images of {z['individuals']} individuals ({z['species']} "
        f"species), seed {results['seed']}, preset `{results['preset']}`; generated in "
        f"{z['seconds']} s. Machine: {machine['cpus']} CPUs, Ray resources "
        f"{machine['ray_resources']}; whole demo {results['seconds']} s.",
        "",
        "Query/gallery/query_unknown rows of the zoo's split (test individuals never seen in "
        "training). top-k and mAP on known queries; BAKS/BAUS: balanced accuracy on known/"
        "unknown queries with the known-vs-new threshold fitted on the gallery alone (whole "
        "individuals left out, never the queries); AUROC: known vs unknown queries by their "
        "top-1 score, threshold free.",
        "",
        "| stage | adds | model | top-1 | top-5 | mAP | BAKS | BAUS | AUROC | threshold | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [full] + [r for r in rows if r is not full]:
        vals = " | ".join(_fmt(r.metrics.get(k)) for k in (*ROW_KEYS, "threshold"))
        name = f"**{r.name}**" if r is full else r.name
        lines.append(f"| {name} | {r.what} | `{r.model}` | {vals} | {r.seconds:.0f} |")
    decision = full.metrics.get("open_set")
    if decision:
        plot = _relative(full.metrics.get("open_set_plot"), out)
        lines += [
            "",
            f"Known-vs-new decision of the full system: threshold {_fmt(decision.get('threshold'))} "
            f"on the {decision.get('score')} (rule `{decision.get('rule')}`), fitted on "
            f"{decision.get('fitted_on')}: {decision.get('n_known')} known and "
            f"{decision.get('n_unknown')} unknown simulated samples, simulated AUROC "
            f"{_fmt(decision.get('auroc'))}. {decision.get('message')}.",
        ]
        if plot:
            lines += ["", f"![BAKS and BAUS against the threshold]({plot})"]
    train = results["stages"].get("train")
    if train:
        s = train["summary"]
        lines += [
            "",
            f"Training (Ray Train, 2 workers, sub-centre ArcFace with dynamic margins): "
            f"{train['seconds']} s; best epoch {s.get('best_epoch')} "
            f"(validation mAP {_fmt(s.get('best_val_mAP'))}); checkpoint `{s.get('checkpoint')}`.",
        ]
        history = s.get("history") or s.get("epochs_history") or []
        if history:
            lines += ["", "| epoch | train loss | val mAP |", "|---|---|---|"]
            for r in history:
                lines.append(
                    f"| {r.get('epoch')} | {_fmt(r.get('train_loss'))} | {_fmt(r.get('val_mAP'))} |"
                )
    lines.append("")
    return "\n".join(lines)
