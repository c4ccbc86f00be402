"""Ray Train wiring: manifest -> image shards -> Ray Datasets -> ``TorchTrainer`` -> ``OUT/model.pt``.

``train()`` reads the manifest (metadata only) on the driver, keeps whole identities out
for calibration (:mod:`~reid_ray.train.rows`), maps the other identities to class indices
and class frequencies to ArcFace margins, builds the start network with
:func:`reid_ray.models.load` (the one loader: same references and preprocessing as
embedding), and runs :func:`reid_ray.train.loop.train_loop` on ``workers`` Ray Train
workers (DDP: gloo on CPU, NCCL on GPU) sized by :func:`reid_ray.runtime.plan_pool`.

Layout of ``OUT`` (local or ``s3://``; a local one is refused on a multi-node cluster)::

    run/epoch_NNNN/       Ray Train checkpoints (model.pt + state.pt): best and latest kept
    shards/<fingerprint>/ the images decoded and resized once (:mod:`~reid_ray.train.shards`;
                          ``shard_cache`` puts them elsewhere; kept by ``--no-resume``)
    train_config.json     the configuration the run was started with (resume checks it)
    model.pt              the best epoch's checkpoint: usable as --model anywhere
    calibration_ids.txt   image_ids of the held-out calibration identities (never trained on)
    metrics.json          per-epoch loss, validation mAP and timings, counts, config
    errors.parquet        images that could not be used (image_id, path, stage, reason)
    manifest.json         the run record, written last: the run is complete

A rerun with the same ``OUT`` resumes from the latest checkpoint (Ray Train finds the run
snapshot under ``OUT/run``); a completed run is not redone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable

import pyarrow as pa
from ray.train import UserCallback

from reid_ray import io as rio
from reid_ray.data import errors_table, read_manifest
from reid_ray.errors import ConfigError, OutputError
from reid_ray.models import CHECKPOINT_FILE, Preprocess, ReidNet, load, reid_net, write_heldout_ids
from reid_ray.parts import write_run_record
from reid_ray.runtime import ClusterView, PoolPlan, plan_pool
from reid_ray.train.config import TrainConfig
from reid_ray.train.data import training_feed
from reid_ray.train.losses import dynamic_margins
from reid_ray.train.outdir import RUN_NAME, completed_run, config_record, prepare_out
from reid_ray.train.rows import (
    calibration_identities,
    class_table,
    group_by_identity,
    select_training_rows,
    split_calibration,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelStart:
    """Where training starts: the network (weights included), its preprocessing, and
    where both came from."""

    net: ReidNet
    preprocess: Preprocess
    description: str


def model_start(cfg: TrainConfig) -> ModelStart:
    """The network to train from ``cfg.model``, through :func:`reid_ray.models.load`: any
    reference the loader takes (``timm:``, ``timm-random:``, a timm model on ``hf-hub:``,
    a checkpoint). ``image_size``/``resize_mode`` override the model's preprocessing."""
    loaded = load(cfg.model, image_size=cfg.image_size, resize_mode=cfg.resize_mode)
    net = reid_net(
        loaded, pooling=cfg.pooling, embedding_dim=cfg.embedding_dim, gem_p=cfg.gem_p, seed=cfg.seed
    )
    return ModelStart(net, loaded.preprocess, loaded.description)


def plan_workers(cluster: ClusterView, cfg: TrainConfig) -> PoolPlan:
    """Resources of the Ray Train workers: ``runtime.plan_pool``'s rule (CPUs from one
    node, Ray Data's reserve left free; explicit GPUs honoured before the autoscaler has
    added GPU nodes)."""
    return plan_pool(
        cluster,
        device="cuda" if cfg.gpus_per_worker > 0 else "cpu",
        actors=cfg.workers,
        cpus_per_actor=cfg.cpus_per_worker or 0.0,
        gpus_per_actor=cfg.gpus_per_worker,
    )


class _ProgressCallback(UserCallback):
    """Ray Train controller callback: forwards rank 0's metrics of each report to a queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            self.queue.put_nowait(dict(metrics[0]))


def _fit_with_progress(trainer, progress: Callable[[dict], None] | None, queue):
    """``trainer.fit()`` in a thread while this thread hands epoch records to ``progress``."""
    box: dict = {}

    def run():
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="reid-ray-train-fit", daemon=True)
    thread.start()
    while True:
        alive = thread.is_alive()
        while queue is not None and not queue.empty():
            record = queue.get_nowait()
            if progress:
                progress(record)
        if not alive:
            break
        thread.join(timeout=1.0)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _make_trainer(
    loop_cfg: dict, datasets: dict, cfg: TrainConfig, resources: dict, out: str, queue
):
    """The ``TorchTrainer``: DDP workers, checkpoints under ``out/run`` (best + latest kept),
    restarts from the last checkpoint after a worker crash."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from reid_ray.train.loop import train_loop

    fs, bare = rio.arrow_filesystem(out)
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu="GPU" in resources, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=bare,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="score",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[_ProgressCallback(queue)] if queue is not None else [],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _read_checkpoint_file(checkpoint, name: str) -> bytes:
    with checkpoint.as_directory() as d, open(f"{d}/{name}", "rb") as f:
        return f.read()


def train(
    manifest_path: str,
    out: str,
    *,
    split_path: str | None = None,
    config: TrainConfig | None = None,
    model_ref: str | None = None,
    epochs: int | None = None,
    workers: int | None = None,
    resume: bool = True,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train an ArcFace re-ID model with Ray Train; returns the run summary (``metrics.json``).

    ``model_ref``/``epochs``/``workers`` override ``config``. ``progress`` is called on the
    driver with each epoch's record (epoch, train_loss, val_mAP, ...).
    """
    import ray
    from ray.util.queue import Queue

    from reid_ray.config import replace
    from reid_ray.runtime import cluster_view, init_ray, require_shared_output
    from reid_ray.train.loop import HISTORY_FILE

    t_start = time.perf_counter()
    cfg = replace(config or TrainConfig(), model=model_ref, epochs=epochs, workers=workers)
    # refuse a local --out on a multi-node cluster before any slow work
    init_ray(log_file=None if rio.is_remote(out) else rio.join(out, "ray.log"))
    require_shared_output(out, "--out")
    manifest = read_manifest(manifest_path, split_path)
    labelled, val_rows, counts = select_training_rows(manifest)
    if labelled.num_rows == 0:
        raise ConfigError(
            f"no labelled training rows in {manifest_path}"
            + (" (split 'train')" if counts["split_used"] else "")
        )
    held_out = calibration_identities(
        class_table(labelled)[0], cfg.calibration_fraction, cfg.calibration_min_identities, cfg.seed
    )
    train_rows, calibration_rows = split_calibration(labelled, held_out)
    classes, class_counts = class_table(train_rows)
    if len(classes) < 2:
        raise ConfigError(
            f"ArcFace needs at least 2 identities in the training rows, found {len(classes)}"
        )
    class_index = {c: i for i, c in enumerate(classes)}
    if cfg.sampler == "pk":
        train_rows = group_by_identity(train_rows, cfg.seed)
    margins = dynamic_margins(
        class_counts, cfg.loss.margin, cfg.loss.margin_min, cfg.loss.margin_lambda
    )
    start = model_start(cfg)

    record = config_record(
        cfg.to_dict(), start.net.cfg.to_dict(), start.preprocess.to_dict(), classes, held_out
    )
    prepare_out(out, record, resume)
    done = completed_run(out, cfg.epochs) if resume else None
    if done is not None:
        logger.info("%s already holds a completed run of %d epochs: nothing to do", out, cfg.epochs)
        return dict(done, skipped=True)
    rio.remove(rio.join(out, "manifest.json"))  # a run in progress must not look complete

    cluster = cluster_view()
    plan = plan_workers(cluster, cfg)
    resources = {
        "CPU": plan.cpus_per_actor,
        **({"GPU": plan.gpus_per_actor} if plan.gpus_per_actor else {}),
    }
    t_prep = time.perf_counter()
    feed = training_feed(
        cfg, train_rows, val_rows, start.preprocess, class_index,
        out=out, cluster=cluster, held_cpus=cfg.workers * plan.cpus_per_actor,
    )  # fmt: skip
    train_ds, n_train, val_ds, n_val, errors = (
        feed.train,
        feed.n_train,
        feed.val,
        feed.n_val,
        feed.errors,
    )
    prepare_s = time.perf_counter() - t_prep
    if errors:
        logger.warning(
            "%d image(s) could not be used; see %s", len(errors), rio.join(out, "errors.parquet")
        )

    rows_per_worker = n_train // cfg.workers
    steps_per_epoch = rows_per_worker // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{n_train} usable training images over {cfg.workers} worker(s) leave {rows_per_worker} per "
            f"worker, less than one batch of {cfg.batch_size}: lower --batch-size or --workers"
        )
    attempt = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    meta = {
        "trained_from": cfg.model,
        "start": start.description,
        "n_classes": len(classes),
        "train_images": n_train,
        "calibration_identities": len(held_out),
        "calibration_images": calibration_rows.num_rows,
        "loss": "sub-center ArcFace, dynamic margins",
        "config": cfg.to_dict(),
    }
    loop_cfg = {
        "train": cfg.to_dict(),
        "net": start.net.cfg.to_dict(),
        "preprocess": start.preprocess.to_dict(),
        "state_ref": ray.put({k: v.detach().cpu() for k, v in start.net.state_dict().items()}),
        "num_classes": len(classes),
        "class_margins": margins.tolist(),
        "steps_per_epoch": steps_per_epoch,
        "has_val": val_ds is not None and n_val >= 2,
        "threads": plan.threads,
        "attempt": attempt,
        "meta": meta,
    }
    datasets = {"train": train_ds.randomize_block_order()}
    if loop_cfg["has_val"]:
        datasets["val"] = val_ds
    queue = Queue(actor_options={"num_cpus": 0}) if progress else None
    trainer = _make_trainer(loop_cfg, datasets, cfg, resources, out, queue)
    logger.info(
        "training %s on %d identities, %d images (%d val, %d identities held out for "
        "calibration); %d worker(s) x %s; %d steps/epoch",
        start.description, len(classes), n_train, n_val, len(held_out), cfg.workers, resources,
        steps_per_epoch,
    )  # fmt: skip
    t_fit = time.perf_counter()
    try:
        result = _fit_with_progress(trainer, progress, queue)
    finally:
        if queue is not None:
            ray.kill(queue.actor)
    fit_s = time.perf_counter() - t_fit

    if not result.best_checkpoints or result.checkpoint is None:
        raise OutputError(f"training under {out} reported no checkpoint")
    best_ckpt, best_metrics = max(
        result.best_checkpoints,
        key=lambda cm: (cm[1].get("score", -math.inf), cm[1].get("epoch", 0)),
    )
    history = json.loads(_read_checkpoint_file(result.checkpoint, HISTORY_FILE))
    model_path = rio.join(out, CHECKPOINT_FILE)
    rio.write_bytes_atomic(model_path, _read_checkpoint_file(best_ckpt, CHECKPOINT_FILE))
    write_heldout_ids(out, calibration_rows["image_id"].to_pylist())
    # rows the manifest rejected and images that would not decode, with their reasons
    rio.write_table_atomic(
        rio.join(out, "errors.parquet"), pa.concat_tables([manifest.errors, errors_table(errors)])
    )

    attempts = sorted({h.get("attempt") for h in history if h.get("attempt")})
    run_counts = {
        **counts,
        "train_images": n_train,
        "train_identities": len(classes),
        "calibration_identities": len(held_out),
        "calibration_images": calibration_rows.num_rows,
        "val_images": n_val,
        "val_identities": len(set(val_rows["identity"].to_pylist())),
        "errors": len(errors),
        "manifest_errors": manifest.errors.num_rows,
    }
    timings = {
        "prepare_s": round(prepare_s, 3),
        "fit_s": round(fit_s, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "mean_epoch_s": _mean([h.get("epoch_s") for h in history if h.get("attempt") == attempt]),
    }
    summary = {
        "command": "train",
        "manifest": str(manifest_path),
        "split": split_path,
        "out": str(out),
        "checkpoint": model_path,
        "model_start": start.description,
        "net": start.net.cfg.to_dict(),
        "preprocess": start.preprocess.to_dict(),
        "config": cfg.to_dict(),
        "epochs_requested": cfg.epochs,
        "epochs_completed": int(history[-1]["epoch"]) if history else 0,
        "resumed": len(attempts) > 1,
        "best_epoch": int(best_metrics["epoch"]),
        "best_val_mAP": best_metrics.get("val_mAP"),
        "val_mAP_start": history[0].get("val_mAP_start") if history else None,
        "val_mAP": [h.get("val_mAP") for h in history],
        "train_loss": [h.get("train_loss") for h in history],
        "history": history,
        "counts": run_counts,
        "margins": {"min": float(margins.min()), "max": float(margins.max())},
        "resources": {"workers": cfg.workers, "per_worker": resources, "plan": plan.to_dict()},
        "feed": feed.info,
        "timings": timings,
    }
    rio.write_json_atomic(rio.join(out, "metrics.json"), summary)
    write_run_record(
        out, "train", config=cfg, counts=run_counts, timings=timings,
        inputs={"manifest": str(manifest_path), "split": split_path, "model": cfg.model},
        outputs={
            "model": CHECKPOINT_FILE, "metrics": "metrics.json", "errors": "errors.parquet",
            "calibration_ids": "calibration_ids.txt", "run": RUN_NAME,
        },
        best_epoch=summary["best_epoch"],
    )  # fmt: skip
    return summary


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 3) if vals else None
