"""``reid-ray demo``: every stage on a fresh toy zoo, on a local Ray cluster, with a report.

A new user's first contact: it generates the toy zoo, evaluates an untrained and an
ImageNet model, trains with Ray Train, evaluates the checkpoint, re-ranks the weak model's
candidates with local features, and writes ``report.md`` and ``metrics.json``: every
figure in them is measured by this run.
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
    "tiny": DemoPreset(2, 16, 6, 160, 64, "timm:resnet18", 2, 16, 5, False),
    "default": DemoPreset(3, 90, 10, 256, 128, "timm:efficientnet_lite0", 12, 16, 10, True),
    "large": DemoPreset(4, 200, 10, 256, 160, "timm:efficientnet_lite0", 16, 16, 20, True),
}

WEAK_MODEL = "timm:resnet18"  # random init: the weak global model re-ranking must lift
IMAGENET_MODEL = "timm:efficientnet_lite0"  # ImageNet weights, offline


def _console():
    from rich.console import Console

    return Console()


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
    console = _console()
    from reid_ray.runtime import init_ray

    t_all = time.perf_counter()
    rio.makedirs(out)
    results: dict[str, Any] = {"preset": preset, "seed": seed, "config": p.__dict__, "stages": {}}
    rows: list[tuple[str, dict, float]] = []

    console.rule("[bold]1/5 toy zoo")
    from reid_ray.synth import generate_zoo

    zoo = generate_zoo(
        rio.join(out, "zoo"), species=p.species, individuals=p.individuals,
        images_per=p.images_per, size=p.zoo_size, seed=seed, progress=True,
    )  # fmt: skip
    results["zoo"] = {"images": zoo.n_images, "individuals": zoo.n_individuals,
                      "species": zoo.n_species, "seconds": round(zoo.seconds, 2)}  # fmt: skip
    console.print(f"{zoo.n_images} images, {zoo.n_individuals} individuals, {zoo.seconds:.1f} s")

    init_ray()
    from reid_ray.evaluation import evaluate

    def run_eval(name: str, model: str, **kw) -> dict:
        t = time.perf_counter()
        metrics = evaluate(
            zoo.metadata_path, zoo.split_path, model, rio.join(out, "eval", name),
            image_size=kw.pop("image_size", p.image_size), command=f"demo {name}", **kw,
        )  # fmt: skip
        seconds = time.perf_counter() - t
        results["stages"][name] = {"model": model, "seconds": round(seconds, 1), "metrics": metrics}
        rows.append((name, metrics, seconds))
        console.print(_one_line(name, metrics, seconds))
        return metrics

    console.rule("[bold]2/5 evaluate untrained and ImageNet models")
    run_eval("untrained-resnet18", WEAK_MODEL)
    run_eval("imagenet-efficientnet-lite0", IMAGENET_MODEL)

    if train:
        console.rule("[bold]3/5 train (Ray Train, 2 workers, sub-centre ArcFace)")
        from reid_ray.train import TrainConfig
        from reid_ray.train import train as run_train

        t = time.perf_counter()
        cfg = TrainConfig(
            model=p.train_backbone, image_size=p.image_size, epochs=p.train_epochs,
            workers=2, batch_size=p.train_batch, seed=seed,
        )  # fmt: skip
        train_out = rio.join(out, "train")
        summary = run_train(zoo.metadata_path, train_out, split_path=zoo.split_path, config=cfg,
                            progress=lambda r: console.print(_epoch_line(r)))  # fmt: skip
        results["stages"]["train"] = {
            "seconds": round(time.perf_counter() - t, 1),
            "summary": summary,
        }
        console.rule("[bold]4/5 evaluate the trained checkpoint")
        run_eval("trained", train_out, image_size=None)

    if rerank:
        console.rule("[bold]5/5 re-rank the weak model's candidates with local features")
        from reid_ray.rerank import RerankConfig

        side = p.zoo_size  # the zoo's crops are already large enough: no upscaling
        classical = RerankConfig(
            extractor="sift", matcher="classical", top_k=p.rerank_top_k, resize_long_side=side
        )
        run_eval("untrained-resnet18+classical", WEAK_MODEL, rerank=classical)
        if p.lightglue:
            # LightGlue costs ~0.2-0.5 s per pair on 2 CPU cores: a shorter list keeps the
            # demo within minutes (the classical matcher above re-ranks the full top-K).
            short = max(1, p.rerank_top_k // 2)
            glue = RerankConfig(
                extractor="disk", matcher="lightglue", top_k=short, calibration_top_k=short,
                resize_long_side=side, max_keypoints=256,
            )  # fmt: skip
            run_eval("untrained-resnet18+lightglue", WEAK_MODEL, rerank=glue)

    results["seconds"] = round(time.perf_counter() - t_all, 1)
    results["machine"] = _machine()
    rio.write_json_atomic(rio.join(out, "metrics.json"), results)
    report = render_report(results, rows)
    rio.write_bytes_atomic(rio.join(out, "report.md"), report.encode())
    console.rule("[bold]summary")
    console.print(_summary_table(rows))
    console.print(f"report: {rio.join(out, 'report.md')}   ({results['seconds']:.0f} s in all)")
    return results


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _one_line(name: str, m: dict, seconds: float) -> str:
    keys = ("top1", "top5", "mAP", "baks", "baus")
    return f"{name}: " + "  ".join(f"{k} {_fmt(m.get(k))}" for k in keys) + f"  ({seconds:.0f} s)"


def _epoch_line(record: dict) -> str:
    keys = [k for k in ("epoch", "train_loss", "val_mAP", "val_top1", "epoch_s") if k in record]
    return "  train " + "  ".join(f"{k} {_fmt(record[k])}" for k in keys)


def _summary_table(rows):
    from rich.table import Table

    table = Table(title="measured on this run")
    for col in ("stage", "top-1", "top-5", "mAP", "BAKS", "BAUS", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, m, seconds in rows:
        table.add_row(
            name,
            *(_fmt(m.get(k)) for k in ("top1", "top5", "mAP", "baks", "baus")),
            f"{seconds:.0f}",
        )
    return table


def _machine() -> dict:
    import os

    import ray

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "ray_resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def render_report(results: dict, rows) -> str:
    """The report: what was run, on what data, and the measured figures."""
    z = results["zoo"]
    lines = [
        "# reid-ray demo report",
        "",
        f"Toy zoo: {z['images']} images of {z['individuals']} individuals ({z['species']} species), "
        f"seed {results['seed']}, preset `{results['preset']}`; generated in {z['seconds']} s.",
        f"Machine: {results['machine']['cpus']} CPUs, Ray resources {results['machine']['ray_resources']}; "
        f"whole demo {results['seconds']} s.",
        "",
        "Query/gallery/query_unknown rows of the zoo's split (test individuals never seen in training). "
        "top-k and mAP on known queries; BAKS/BAUS balanced accuracy on known/unknown queries "
        "with the threshold chosen on the gallery alone.",
        "",
        "| stage | model | top-1 | top-5 | mAP | BAKS | BAUS | threshold | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m, seconds in rows:
        model = results["stages"][name]["model"]
        vals = " | ".join(
            _fmt(m.get(k)) for k in ("top1", "top5", "mAP", "baks", "baus", "threshold")
        )
        lines.append(f"| {name} | `{model}` | {vals} | {seconds:.0f} |")
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
