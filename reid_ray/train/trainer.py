"""Ray Train wiring: manifest -> decoded Ray Datasets -> ``TorchTrainer`` -> ``OUT/model.pt``.

``train()`` reads the manifest (metadata only) on the driver, maps identities to class
indices and class frequencies to ArcFace margins, decodes the ``train`` and ``val`` images
once with Ray Data (kept in the object store for every epoch), and runs
:func:`reid_ray.train.loop.train_loop` on ``workers`` Ray Train workers (DDP: gloo on CPU,
NCCL on GPU).

Layout of ``OUT`` (local or ``s3://``)::

    run/epoch_NNNN/      Ray Train checkpoints (model.pt + state.pt): best and latest kept
    train_config.json    the configuration the run was started with (resume checks it)
    model.pt             the best epoch's checkpoint: usable as --model anywhere
    metrics.json         per-epoch loss, validation mAP and timings, counts, config
    errors.parquet       images that could not be used (image_id, path, stage, reason)
    manifest.json        written last: the run is complete

A rerun with the same ``OUT`` resumes from the latest checkpoint (Ray Train finds the run
snapshot under ``OUT/run``); a completed run is not redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from ray.train import UserCallback

from reid_ray import io as rio
from reid_ray.data import Manifest, errors_table, read_manifest
from reid_ray.errors import ConfigError, ModelError, OutputError
from reid_ray.models import CHECKPOINT_FILE, NetConfig, Preprocess
from reid_ray.models.loader import OFFLINE_WEIGHTS, parse_ref, read_checkpoint
from reid_ray.train.config import TrainConfig
from reid_ray.train.losses import dynamic_margins

logger = logging.getLogger(__name__)

RUN_NAME = "run"
CONFIG_FILE = "train_config.json"
#: settings that may change between a run and its resumption (resources, length)
RESUMABLE_CHANGES = ("epochs", "workers", "cpus_per_worker", "gpus_per_worker", "max_failures", "keep_checkpoints")
OUTPUT_FILES = (CHECKPOINT_FILE, "metrics.json", "errors.parquet", "manifest.json", CONFIG_FILE)


@dataclass
class ModelStart:
    """Where training starts: the network's config, its preprocessing and its weights."""

    net: NetConfig
    preprocess: Preprocess
    kind: str  # "timm" | "checkpoint"
    description: str
    state_dict: dict | None = None


def resolve_model(cfg: TrainConfig) -> ModelStart:
    """The network to train from ``cfg.model`` (``timm:NAME`` or a reid-ray checkpoint)."""
    kind, name = parse_ref(cfg.model)
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise ModelError(f"unknown timm architecture {name!r} (see timm.list_models())")
        pcfg = timm.get_pretrained_cfg(name)
        size = cfg.image_size or (int(pcfg.input_size[1]) if pcfg else 224)
        preprocess = Preprocess(
            input_size=(size, size),
            mean=tuple(pcfg.mean) if pcfg else Preprocess().mean,
            std=tuple(pcfg.std) if pcfg else Preprocess().std,
            interpolation=(pcfg.interpolation if pcfg else "bilinear") or "bilinear",
            resize_mode=cfg.resize_mode or "resize",
        )
        net = NetConfig(
            backbone=name,
            pooling=cfg.pooling or "gem",
            embedding_dim=512 if cfg.embedding_dim is None else cfg.embedding_dim,
            gem_p=cfg.gem_p,
        )
        weights = "ImageNet weights (offline package)" if name in OFFLINE_WEIGHTS else "random init"
        return ModelStart(net, preprocess, "timm", f"timm {name}, {weights}")
    if kind == "checkpoint":
        payload = read_checkpoint(name)
        net = NetConfig.from_dict(payload["net"])
        for key in ("embedding_dim", "pooling"):
            asked = getattr(cfg, key)
            if asked is not None and asked != getattr(net, key):
                raise ConfigError(
                    f"{key}={asked!r} differs from the checkpoint's ({getattr(net, key)!r}); "
                    f"training from a checkpoint keeps its network: leave {key} unset"
                )
        preprocess = Preprocess.from_dict(payload["preprocess"]).with_size(cfg.image_size)
        if cfg.resize_mode:
            preprocess = Preprocess(
                preprocess.input_size, preprocess.mean, preprocess.std, preprocess.interpolation, cfg.resize_mode
            )
        epoch = payload.get("meta", {}).get("epoch")
        desc = f"reid-ray checkpoint {name} ({net.backbone}" + (f", epoch {epoch})" if epoch else ")")
        return ModelStart(net, preprocess, "checkpoint", desc, payload["state_dict"])
    raise ModelError(
        f"cannot train from {cfg.model!r}: training starts from timm:NAME (offline ImageNet "
        f"weights where a package ships them) or a reid-ray checkpoint"
    )


def select_training_rows(manifest: Manifest) -> tuple[pa.Table, pa.Table, dict]:
    """(train rows, val rows, counts). Without any ``split`` values every labelled row trains."""
    import pyarrow.compute as pc

    table = manifest.table
    has_split = table.num_rows > 0 and pc.any(pc.is_valid(table["split"])).as_py()
    if has_split:
        train, val = manifest.select_splits("train").table, manifest.select_splits("val").table
    else:
        train, val = table, table.slice(0, 0)
    labelled = pc.is_valid(train["identity"])
    counts = {
        "split_used": bool(has_split),
        "train_rows": train.num_rows,
        "train_unlabelled_skipped": train.num_rows - int(pc.sum(labelled).as_py() or 0),
    }
    train = train.filter(labelled)
    val = val.filter(pc.is_valid(val["identity"]))
    return train, val, counts


def class_table(train: pa.Table) -> tuple[list[str], np.ndarray]:
    """Sorted identities (class index = position) and their image counts."""
    ids, counts = np.unique(np.asarray(train["identity"].to_pylist(), dtype=str), return_counts=True)
    return [str(i) for i in ids], counts


def _add_labels(batch: dict, *, class_index: dict[str, int]) -> dict:
    ids = batch.get("identity")
    labels = [class_index.get(str(i), -1) for i in ids] if ids is not None else []
    return {
        "image_id": batch["image_id"],
        "path": batch["path"],
        "identity": batch["identity"],
        "error": batch["error"],
        "image": batch["image"],
        "label": np.asarray(labels, dtype=np.int64),
    }


def _ok_rows(batch: dict) -> dict:
    keep = np.asarray(batch["error"]) == ""
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


def _error_rows(batch: dict) -> dict:
    bad = np.asarray(batch["error"]) != ""
    return {k: np.asarray(batch[k])[bad] for k in ("image_id", "path", "error")}


def decoded_dataset(table: pa.Table, preprocess: Preprocess, size: int, class_index: dict[str, int], stage: str):
    """Decode ``table``'s images once into the object store; returns (dataset, n_ok, errors)."""
    from reid_ray.data.pipeline import image_dataset

    ds = image_dataset(
        table,
        size=(size, size),
        resize_mode=preprocess.resize_mode,
        interpolation=preprocess.interpolation,
        batch_size=32,
        rows_per_block=64,
    ).map_batches(_add_labels, fn_kwargs={"class_index": class_index}, batch_format="numpy")
    ds = ds.materialize()
    bad = ds.map_batches(_error_rows, batch_format="numpy").take_all()
    errors = [dict(image_id=r["image_id"], path=r["path"], stage=stage, reason=r["error"]) for r in bad]
    if errors:
        ds = ds.map_batches(_ok_rows, batch_format="numpy").materialize()
    return ds, ds.count(), errors


def _auto_cpus_per_worker(workers: int, use_gpu: bool) -> float:
    """Share the cluster's CPUs, leaving half a core for Ray Data and the driver."""
    from reid_ray.runtime import cluster_cpus

    cpus = cluster_cpus()
    share = (cpus - 0.5) / workers
    return float(min(8.0 if use_gpu else 16.0, max(0.25, math.floor(share * 4) / 4)))


def _config_record(cfg: TrainConfig, start: ModelStart, classes: list[str]) -> dict:
    train = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    return {
        "train": train,
        "net": start.net.to_dict(),
        "preprocess": start.preprocess.to_dict(),
        "classes_sha256": hashlib.sha256("\n".join(classes).encode()).hexdigest(),
        "n_classes": len(classes),
    }


def _normalise(obj):
    return json.loads(json.dumps(rio.json_safe(obj), default=str))


def _config_diff(prior, record: dict) -> list[str]:
    """Names of the settings that differ (``section.key`` inside sections)."""
    if not isinstance(prior, dict):
        return ["<unreadable train_config.json>"]
    diff = []
    for key in sorted(set(prior) | set(record)):
        a, b = prior.get(key), record.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diff.append(key)
    return diff


def _prepare_out(out: str, record: dict, resume: bool) -> None:
    """Start cleanly (no resume) or check that ``out`` holds a run of the same config."""
    config_path = rio.join(out, CONFIG_FILE)
    if not resume:
        for name in OUTPUT_FILES:
            rio.remove(rio.join(out, name))
        rio.remove(rio.join(out, RUN_NAME), recursive=True)
    elif rio.exists(config_path):
        diff = _config_diff(_normalise(rio.read_json(config_path)), _normalise(record))
        if diff:
            raise OutputError(
                f"{out} holds a training run with another configuration (differs in: "
                f"{', '.join(diff)}); use --no-resume to start over there, or another --out"
            )
    elif rio.exists(rio.join(out, RUN_NAME)):
        raise OutputError(f"{out}/{RUN_NAME} exists without {CONFIG_FILE}: use --no-resume or another --out")
    rio.makedirs(out)
    if not rio.exists(config_path):
        rio.write_json_atomic(config_path, record)


def _completed(out: str, epochs: int) -> dict | None:
    """The summary of a finished run in ``out`` that already reached ``epochs``."""
    if not rio.exists(rio.join(out, "manifest.json")) or not rio.exists(rio.join(out, "metrics.json")):
        return None
    metrics = rio.read_json(rio.join(out, "metrics.json"))
    if metrics.get("epochs_completed", 0) >= epochs and metrics.get("epochs_requested") == epochs:
        return metrics
    return None


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


def _make_trainer(loop_cfg: dict, datasets: dict, cfg: TrainConfig, resources: dict, out: str, queue):
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

    from reid_ray.runtime import cluster_gpus, init_ray
    from reid_ray.train.loop import HISTORY_FILE

    t_start = time.perf_counter()
    cfg = (config or TrainConfig()).replace(model=model_ref, epochs=epochs, workers=workers)
    manifest = read_manifest(manifest_path, split_path)
    train_rows, val_rows, counts = select_training_rows(manifest)
    if train_rows.num_rows == 0:
        raise ConfigError(
            f"no labelled training rows in {manifest_path}"
            + (" (split 'train')" if counts["split_used"] else "")
        )
    classes, class_counts = class_table(train_rows)
    if len(classes) < 2:
        raise ConfigError(f"ArcFace needs at least 2 identities in the training rows, found {len(classes)}")
    class_index = {c: i for i, c in enumerate(classes)}
    margins = dynamic_margins(class_counts, cfg.loss.margin, cfg.loss.margin_min, cfg.loss.margin_lambda)
    start = resolve_model(cfg)

    record = _config_record(cfg, start, classes)
    _prepare_out(out, record, resume)
    done = _completed(out, cfg.epochs) if resume else None
    if done is not None:
        logger.info("%s already holds a completed run of %d epochs: nothing to do", out, cfg.epochs)
        return dict(done, skipped=True)
    rio.remove(rio.join(out, "manifest.json"))  # a run in progress must not look complete

    init_ray()
    use_gpu = cfg.gpus_per_worker > 0
    if use_gpu and cluster_gpus() < cfg.gpus_per_worker:
        raise ConfigError(
            f"gpus_per_worker={cfg.gpus_per_worker} but the Ray cluster has {cluster_gpus():g} GPU(s)"
        )
    t_prep = time.perf_counter()
    size = start.preprocess.input_size[0]
    decode_size = int(round(size * cfg.augment.decode_scale))
    train_ds, n_train, errors = decoded_dataset(train_rows, start.preprocess, decode_size, class_index, "train")
    val_ds, n_val, val_errors = (None, 0, [])
    if val_rows.num_rows:
        val_ds, n_val, val_errors = decoded_dataset(val_rows, start.preprocess, size, class_index, "val")
    errors += val_errors
    prepare_s = time.perf_counter() - t_prep
    if errors:
        logger.warning("%d image(s) could not be used; see %s", len(errors), rio.join(out, "errors.parquet"))

    rows_per_worker = n_train // cfg.workers
    steps_per_epoch = rows_per_worker // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{n_train} usable training images over {cfg.workers} worker(s) leave {rows_per_worker} per "
            f"worker, less than one batch of {cfg.batch_size}: lower --batch-size or --workers"
        )
    cpus = cfg.cpus_per_worker or _auto_cpus_per_worker(cfg.workers, use_gpu)
    resources = {"CPU": cpus, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    attempt = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    meta = {
        "trained_from": cfg.model,
        "start": start.description,
        "n_classes": len(classes),
        "train_images": n_train,
        "loss": "sub-center ArcFace, dynamic margins",
        "config": cfg.to_dict(),
    }
    loop_cfg = {
        "train": cfg.to_dict(),
        "net": start.net.to_dict(),
        "preprocess": start.preprocess.to_dict(),
        "init": {
            "kind": start.kind,
            "state_ref": ray.put(start.state_dict) if start.state_dict is not None else None,
        },
        "num_classes": len(classes),
        "class_margins": margins.tolist(),
        "steps_per_epoch": steps_per_epoch,
        "has_val": val_ds is not None and n_val >= 2,
        "threads": max(1, int(round(cpus))),
        "attempt": attempt,
        "meta": meta,
    }
    datasets = {"train": train_ds.randomize_block_order()}
    if loop_cfg["has_val"]:
        datasets["val"] = val_ds
    queue = Queue(actor_options={"num_cpus": 0}) if progress else None
    trainer = _make_trainer(loop_cfg, datasets, cfg, resources, out, queue)
    logger.info(
        "training %s on %d identities, %d images (%d val); %d worker(s) x %s; %d steps/epoch",
        start.description, len(classes), n_train, n_val, cfg.workers, resources, steps_per_epoch,
    )
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
        result.best_checkpoints, key=lambda cm: (cm[1].get("score", -math.inf), cm[1].get("epoch", 0))
    )
    history = json.loads(_read_checkpoint_file(result.checkpoint, HISTORY_FILE))
    model_path = rio.join(out, CHECKPOINT_FILE)
    rio.write_bytes_atomic(model_path, _read_checkpoint_file(best_ckpt, CHECKPOINT_FILE))
    # rows the manifest rejected and images that would not decode, with their reasons
    rio.write_table_atomic(
        rio.join(out, "errors.parquet"), pa.concat_tables([manifest.errors, errors_table(errors)])
    )

    attempts = sorted({h.get("attempt") for h in history if h.get("attempt")})
    summary = {
        "command": "train",
        "manifest": str(manifest_path),
        "split": split_path,
        "out": str(out),
        "checkpoint": model_path,
        "model_start": start.description,
        "net": start.net.to_dict(),
        "preprocess": start.preprocess.to_dict(),
        "config": cfg.to_dict(),
        "epochs_requested": cfg.epochs,
        "epochs_completed": int(history[-1]["epoch"]) if history else 0,
        "resumed": len(attempts) > 1,
        "best_epoch": int(best_metrics["epoch"]),
        "best_val_mAP": best_metrics.get("val_mAP"),
        "val_mAP": [h.get("val_mAP") for h in history],
        "train_loss": [h.get("train_loss") for h in history],
        "history": history,
        "counts": {
            **counts,
            "train_images": n_train,
            "train_identities": len(classes),
            "val_images": n_val,
            "val_identities": len(set(val_rows["identity"].to_pylist())),
            "errors": len(errors),
            "manifest_errors": manifest.errors.num_rows,
        },
        "margins": {"min": float(margins.min()), "max": float(margins.max())},
        "resources": {"workers": cfg.workers, "per_worker": resources, "use_gpu": use_gpu},
        "timings": {
            "prepare_s": round(prepare_s, 3),
            "fit_s": round(fit_s, 3),
            "total_s": round(time.perf_counter() - t_start, 3),
            "mean_epoch_s": _mean([h.get("epoch_s") for h in history if h.get("attempt") == attempt]),
        },
    }
    rio.write_json_atomic(rio.join(out, "metrics.json"), summary)
    rio.write_json_atomic(
        rio.join(out, "manifest.json"),
        {
            "command": "train",
            "inputs": {"manifest": str(manifest_path), "split": split_path, "model": cfg.model},
            "outputs": {
                "model": CHECKPOINT_FILE,
                "metrics": "metrics.json",
                "errors": "errors.parquet",
                "run": RUN_NAME,
            },
            "best_epoch": summary["best_epoch"],
            "counts": summary["counts"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return summary


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 3) if vals else None
