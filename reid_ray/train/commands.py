"""``reid-ray train``: the command function (registered by ``reid_ray.cli``).

Light at import time: the library is imported when the command runs. ``jobs/train_arcface.py``
runs this same function, so the job and the command take the same options.
"""

from __future__ import annotations

import typer


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _feed_text(feed: dict) -> str:
    if feed.get("feed") != "shards":
        return "decoded from the original files every epoch"
    return (
        f"shards in {feed.get('root')} ({feed.get('written', 0)} decoded now, "
        f"{feed.get('reused', 0)} reused); {feed.get('read_tasks')} reader(s) x "
        f"{feed.get('read_cpus')} CPU each epoch"
    )


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The one-screen summary of a run (``metrics.json``), as key/value rows."""
    c, t, r = summary["counts"], summary["timings"], summary["resources"]
    curve = ", ".join(_fmt(v, 3) for v in summary["val_mAP"][-8:])
    if summary.get("val_mAP_start") is not None and len(summary["val_mAP"]) <= 8:
        curve = f"{_fmt(summary['val_mAP_start'], 3)} (start) -> {curve}"
    return [
        ("started from", summary["model_start"]),
        ("network", f"{summary['net']['backbone']} + {summary['net']['pooling']} -> "
                    f"{summary['net']['embedding_dim']}-d, {summary['preprocess']['input_size'][0]} px"),
        ("train rows", f"{c['train_images']} images of {c['train_identities']} individuals "
                       f"({c['train_unlabelled_skipped']} unlabelled skipped)"),
        ("held out", f"{c.get('calibration_images', 0)} images of "
                     f"{c.get('calibration_identities', 0)} individuals (calibration, never trained on)"),
        ("val rows", f"{c['val_images']} images of {c['val_identities']} individuals"),
        ("errors", f"{c['errors']} images, {c['manifest_errors']} manifest rows"),
        ("epochs", f"{summary['epochs_completed']}/{summary['epochs_requested']}"
                   + (" (resumed from a checkpoint)" if summary.get("resumed") else "")
                   + (" (already complete: nothing run)" if summary.get("skipped") else "")),
        ("val mAP by epoch", curve + (" ..." if len(summary["val_mAP"]) > 8 else "") if curve else "-"),
        ("best", f"epoch {summary['best_epoch']}, val mAP {_fmt(summary['best_val_mAP'])}"),
        ("images", _feed_text(summary.get("feed") or {})),
        ("workers", f"{r['workers']} x {r['per_worker']}"),
        ("time", f"{t['total_s']:.1f} s (images {t['prepare_s']:.1f} s, fit {t['fit_s']:.1f} s, "
                 f"{_fmt(t['mean_epoch_s'], 1)} s/epoch)"),
        ("checkpoint", f"{summary['checkpoint']} (use as --model)"),
    ]  # fmt: skip


def train_command(
    manifest: str | None = typer.Option(None, help="Manifest (CSV or Parquet; local or s3://)."),
    split: str | None = typer.Option(
        None,
        help="Split file (image_id,split): trains on 'train', validates on 'val'. "
        "Default: the manifest's split column; without one, every labelled row trains.",
    ),
    model: str | None = typer.Option(
        None,
        help="Start from any model reference: timm:NAME (local pretrained weights), "
        "timm:NAME@FILE, timm-random:NAME, hf-hub:ORG/NAME (local cache) or a reid-ray "
        "checkpoint. Default: timm:efficientnet_lite0.",
    ),
    out: str | None = typer.Option(
        None, help="Output folder (local or s3://): model.pt, metrics.json, run/."
    ),
    epochs: int | None = typer.Option(None, min=1, help="Epochs (default 10)."),
    workers: int | None = typer.Option(None, min=1, help="Ray Train workers (default 2)."),
    batch_size: int | None = typer.Option(
        None, min=2, help="Images per batch per worker (default 16)."
    ),
    lr: float | None = typer.Option(
        None, min=0.0, help="Learning rate (default 2e-3; ArcFace weights x10)."
    ),
    image_size: int | None = typer.Option(
        None, min=16, help="Input side in pixels (default: model's)."
    ),
    embedding_dim: int | None = typer.Option(None, min=1, help="Embedding size (default 512)."),
    gpus_per_worker: float | None = typer.Option(None, min=0.0, help="GPUs per worker (0: CPU)."),
    cpus_per_worker: float | None = typer.Option(
        None, min=0.0, help="CPUs per worker (default: one node's CPUs shared)."
    ),
    sampler: str | None = typer.Option(
        None, help="random, or pk (P identities x K images per batch)."
    ),
    hflip: bool | None = typer.Option(
        None,
        "--hflip/--no-hflip",
        help="Horizontal flip augmentation (default off: flanks differ).",
    ),
    config: str | None = typer.Option(
        None,
        help="YAML job config (jobs/configs/train_arcface.yaml); options given here override it.",
    ),
    resume: bool | None = typer.Option(
        None,
        "--resume/--no-resume",
        help="Resume from the last checkpoint in --out (default), or start over, deleting it.",
    ),
) -> None:
    """Train a re-ID model (timm backbone + GeM + neck, sub-centre ArcFace with dynamic
    margins) with Ray Train on the train rows; validate on the val rows; write a checkpoint
    usable as --model."""
    import logging

    from reid_ray import console
    from reid_ray.config import replace
    from reid_ray.errors import ConfigError
    from reid_ray.train.config import JobConfig, TrainConfig, load_job_config
    from reid_ray.train.trainer import train

    log = logging.getLogger("reid_ray.train")
    job = load_job_config(config) if config else JobConfig()
    manifest = manifest or job.manifest
    out = out or job.out
    split = split or job.split
    if not manifest or not out:
        raise ConfigError("give --manifest and --out (or a --config that names them)")
    cfg: TrainConfig = replace(
        job.train, model=model, epochs=epochs, workers=workers, batch_size=batch_size, lr=lr,
        image_size=image_size, embedding_dim=embedding_dim, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, sampler=sampler, **{"augment.hflip": hflip},
    )  # fmt: skip
    with console.progress() as update:
        update("epochs", 0, cfg.epochs)

        def progress(record: dict) -> None:
            update("epochs", int(record["epoch"]), cfg.epochs)
            log.info(
                "epoch %d: loss %s, val mAP %s, %s s", record["epoch"],
                _fmt(record.get("train_loss"), 3), _fmt(record.get("val_mAP"), 3),
                _fmt(record.get("epoch_s"), 1),
            )  # fmt: skip

        summary = train(
            manifest, out, split_path=split, config=cfg,
            resume=job.resume if resume is None else resume, progress=progress,
        )  # fmt: skip
        update("epochs", summary["epochs_completed"], cfg.epochs)
    console.summary("train", summary_rows(summary))
