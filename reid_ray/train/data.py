"""Training and validation images as Ray Datasets, labelled, bad images set aside.

Two feeds (``TrainConfig.feed``):

* ``shards`` (default): every image is decoded, cropped and resized once into Parquet
  shards (:mod:`reid_ray.train.shards`) on Ray Data tasks that use the whole cluster
  before training starts; every epoch then streams the small stored images, on tasks
  sized by the CPUs the training workers leave. Bad images are known from the shards'
  index: no extra pass. A rerun, or a run with the same input size, decodes nothing.
* ``decode`` (the former path, kept to measure against): every epoch streams the
  read -> decode -> label pipeline over the original files on at most 8 half-CPU tasks,
  after one pass on the driver that collects the rows that failed.

Either way, small decoded sets (up to ``decoded_cache_mb``) are kept in the object store
for every epoch; larger ones are never materialised, so object-store use does not grow
with the data (a 140k-image set at 224 px would be ~28 GB). The usable count is known
before the first step (DDP needs equal steps per worker).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.models import Preprocess
from reid_ray.runtime import ClusterView, plan_data_tasks

logger = logging.getLogger(__name__)

KEEP = ("image_id", "identity", "image", "label")
#: CPUs of the Ray Data tasks that feed training: they run beside the workers, in the
#: reserve ``runtime.plan_pool`` leaves (half a CPU on small nodes); a task asking 1 CPU
#: there would wait forever
DECODE_CPUS = 0.5
FILTER_CPUS = 0.125


def add_labels(batch: dict, *, class_index: dict[str, int]) -> dict:
    """Class indices for the ``identity`` column (-1 for an identity outside the classes)."""
    ids = batch.get("identity")
    labels = [class_index.get(str(i), -1) for i in ids] if ids is not None else []
    return {**batch, "label": np.asarray(labels, dtype=np.int64)}


def ok_rows(batch: dict) -> dict:
    """The decoded rows, with only the columns training reads."""
    keep = np.asarray(batch["error"]) == ""
    return {k: np.asarray(batch[k])[keep] for k in KEEP}


def error_rows(batch: dict) -> dict:
    bad = np.asarray(batch["error"]) != ""
    return {k: np.asarray(batch[k])[bad] for k in ("image_id", "path", "error")}


def decoded_mb(rows: int, size: int) -> float:
    """Object-store size of ``rows`` decoded ``size`` x ``size`` RGB images, in MiB."""
    return rows * size * size * 3 / 2**20


def decoded_dataset(
    table: pa.Table,
    preprocess: Preprocess,
    size: int,
    class_index: dict[str, int],
    stage: str,
    *,
    cache_mb: float,
):
    """``(dataset, usable rows, errors)`` for ``table``'s images decoded at ``size`` px.

    ``errors`` are ``{image_id, path, stage, reason}`` dicts; the dataset holds only usable
    rows (``image_id``, ``identity``, ``image``, ``label``)."""
    from reid_ray.data.pipeline import image_dataset

    ds = image_dataset(
        table,
        size=(size, size),
        resize_mode=preprocess.resize_mode,
        interpolation=preprocess.interpolation,
        batch_size=32,
        rows_per_block=64,
        num_cpus=DECODE_CPUS,
    ).map_batches(
        add_labels,
        fn_kwargs={"class_index": class_index},
        batch_format="numpy",
        num_cpus=FILTER_CPUS,
    )
    cached = decoded_mb(table.num_rows, size) <= cache_mb
    if cached:
        ds = ds.materialize()
    else:
        logger.info(
            "%s: %d images (~%.0f MiB decoded) are streamed each epoch, not cached",
            stage, table.num_rows, decoded_mb(table.num_rows, size),
        )  # fmt: skip
    errors = [
        dict(image_id=str(r["image_id"]), path=str(r["path"]), stage=stage, reason=str(r["error"]))
        for batch in ds.map_batches(
            error_rows, batch_format="numpy", num_cpus=FILTER_CPUS
        ).iter_batches(batch_format="pandas")
        for r in batch.to_dict("records")
    ]
    usable = ds.map_batches(ok_rows, batch_format="numpy", num_cpus=FILTER_CPUS)
    return usable, table.num_rows - len(errors), errors


@dataclasses.dataclass
class Feed:
    """What the workers stream: the usable rows of train and val, and the bad images."""

    train: object  # ray.data.Dataset
    n_train: int
    val: object | None
    n_val: int
    errors: list[dict]
    info: dict  # recorded in metrics.json: feed, shard folder, reused/written, tasks


def training_feed(
    cfg,
    train_rows: pa.Table,
    val_rows: pa.Table,
    preprocess: Preprocess,
    class_index: dict[str, int],
    *,
    out: str,
    cluster: ClusterView,
    held_cpus: float,
) -> Feed:
    """The train and val datasets of ``cfg.feed`` (a :class:`~reid_ray.train.config.TrainConfig`);
    ``held_cpus`` is what the training workers will hold, the rest decodes each epoch."""
    size = preprocess.input_size[0]
    decode_size = int(round(size * cfg.augment.decode_scale))
    if cfg.feed == "decode":
        train_ds, n_train, errors = decoded_dataset(
            train_rows, preprocess, decode_size, class_index, "train", cache_mb=cfg.decoded_cache_mb
        )
        val_ds, n_val, val_errors = None, 0, []
        if val_rows.num_rows:
            val_ds, n_val, val_errors = decoded_dataset(
                val_rows, preprocess, size, class_index, "val", cache_mb=cfg.decoded_cache_mb
            )
        return Feed(train_ds, n_train, val_ds, n_val, errors + val_errors, {"feed": "decode"})

    from reid_ray.train.shards import ShardSpec, ensure_shards, shard_dataset

    root = cfg.shard_cache or rio.join(out, "shards")
    write_tasks, write_cpus = plan_data_tasks(cluster)  # nothing else runs yet
    read_tasks, read_cpus = plan_data_tasks(cluster, held_cpus=held_cpus)
    info: dict = {
        "feed": "shards", "root": root, "write_tasks": write_tasks, "write_cpus": write_cpus,
        "read_tasks": read_tasks, "read_cpus": read_cpus, "reused": 0, "written": 0,
    }  # fmt: skip
    errors: list[dict] = []

    def stream(rows: pa.Table, px: int, stage: str):
        spec = ShardSpec(
            size=px,
            resize_mode=preprocess.resize_mode,
            interpolation=preprocess.interpolation,
            format=cfg.shard_format,
            quality=cfg.shard_quality,
        )
        shards = ensure_shards(
            rows, root, spec, class_index, tasks=write_tasks, cpus_per_task=write_cpus
        )
        info["reused"] += shards.reused
        info["written"] += shards.written
        info[f"{stage}_folder"] = shards.folder
        errors.extend(dict(e, stage=stage) for e in shards.errors)
        n = len(shards.take)
        if n == 0:
            return None, 0
        ds = shard_dataset(shards, tasks=read_tasks, cpus_per_task=read_cpus)
        if decoded_mb(n, px) <= cfg.decoded_cache_mb:
            ds = ds.materialize()
        return ds, n

    train_ds, n_train = stream(train_rows, decode_size, "train")
    val_ds, n_val = stream(val_rows, size, "val") if val_rows.num_rows else (None, 0)
    return Feed(train_ds, n_train, val_ds, n_val, errors, info)
