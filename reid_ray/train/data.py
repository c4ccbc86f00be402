"""Decoded training and validation images as Ray Datasets, labelled, bad images set aside.

Small decoded sets (up to ``decoded_cache_mb``) are decoded once and kept in the object
store for every epoch. Larger ones are never materialised: each epoch streams the
read -> decode -> label pipeline again, so object-store use does not grow with the data
(a 140k-image set at 224 px would be ~28 GB). Either way one pass on the driver collects
only the rows that failed, with their reasons, and the usable count (DDP needs equal
steps per worker, known before the first step).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from reid_ray.models import Preprocess

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
