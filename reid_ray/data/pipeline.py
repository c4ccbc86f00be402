"""Ray Data wiring for images: manifest rows -> decoded, cropped, resized uint8 arrays.

The decode step is a plain function over one batch (``load_batch``); ``Decoder`` is the
same function as a callable class, so it runs on long-lived actors; ``decode_stage`` adds
it to a Dataset (actors by default, Ray tasks on request). Every stage that needs images
(embedding, the image dataset of other stages) decodes through ``decode_stage``.

A row that fails keeps its place with a zero image and its ``error`` reason, so the stage
downstream counts it and writes it to the errors table instead of losing it.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from reid_ray.data.images import decode_image, read_image_bytes, resize_image
from reid_ray.data.manifest import Manifest
from reid_ray.errors import ImageError

logger = logging.getLogger(__name__)

PASS_THROUGH = ("image_id", "path", "identity", "species", "viewpoint")

# Decoder actors run at a lower OS priority: Ray's CPU shares are bookkeeping, not limits,
# and a decoder can decode far faster than inference consumes; at equal priority it takes
# cores from the inference actor (the bottleneck) while it fills the object store, most
# visibly while that actor is still importing torch and loading its model. Niced, it
# uses whatever the bottleneck leaves idle, which is all it needs.
DECODER_NICENESS = 10


def _read(path: str) -> bytes | ImageError:
    try:
        return read_image_bytes(path)
    except ImageError as exc:
        return exc


def load_batch(
    batch: dict[str, np.ndarray],
    *,
    size: tuple[int, int],
    resize_mode: str = "resize",
    interpolation: str = "bilinear",
    executor: Executor | None = None,
    read_threads: int = 1,
) -> dict[str, np.ndarray]:
    """Read and decode one batch of manifest rows; failures become ``error`` reasons.

    The files of the batch are read concurrently on ``executor`` (a thread pool kept by
    the caller) or, without one, on ``read_threads`` threads: on an object store each
    read is a round trip, and one at a time leaves the decoder idle. JPEGs much larger
    than ``size`` are decoded at a reduced scale (``decode_image``).
    """
    if executor is None and read_threads > 1 and len(batch["image_id"]) > 1:
        with ThreadPoolExecutor(int(read_threads), thread_name_prefix="read") as pool:
            return load_batch(
                batch,
                size=size,
                resize_mode=resize_mode,
                interpolation=interpolation,
                executor=pool,
            )
    n = len(batch["image_id"])
    size = (int(size[0]), int(size[1]))
    images = np.zeros((n, size[0], size[1], 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    bboxes = batch.get("bbox")
    paths = [str(p) for p in batch["path"]]
    datas = list(executor.map(_read, paths)) if executor is not None else map(_read, paths)
    for i, data in enumerate(datas):
        bbox = None
        if bboxes is not None and bboxes[i] is not None:
            bbox = [float(v) for v in bboxes[i]]
            if any(math.isnan(v) for v in bbox):
                bbox = None
        try:
            if isinstance(data, ImageError):
                raise data
            img = decode_image(data, bbox, target=size)
            images[i] = resize_image(img, size, resize_mode, interpolation)
        except ImageError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must not kill the batch
            errors[i] = f"unexpected {type(exc).__name__}: {exc}"
    out = {k: np.asarray(batch[k], dtype=object) for k in PASS_THROUGH if k in batch}
    out["image"] = images
    out["error"] = errors.astype(str)
    return out


class Decoder:
    """``load_batch`` as a callable class: decoding on long-lived actors, each with a
    thread pool of ``read_threads`` for the reads."""

    def __init__(
        self,
        size,
        resize_mode: str = "resize",
        interpolation: str = "bilinear",
        read_threads: int = 8,
        niceness: int = DECODER_NICENESS,
    ) -> None:
        if niceness > 0:
            os.nice(niceness)  # this process is the actor's alone: it dies with it
        self.kwargs = dict(size=tuple(size), resize_mode=resize_mode, interpolation=interpolation)
        self.pool = ThreadPoolExecutor(max(1, int(read_threads)), thread_name_prefix="read")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return load_batch(batch, executor=self.pool, **self.kwargs)


def manifest_dataset(manifest: Manifest | pa.Table, *, rows_per_block: int = 128):
    """A Ray Dataset of manifest rows split into blocks, so reads run in parallel tasks.

    The manifest is metadata only (a few MB for 100k+ rows); images are never on the driver.
    """
    import ray.data

    table = manifest.table if isinstance(manifest, Manifest) else manifest
    n = table.num_rows
    if n == 0:
        return ray.data.from_arrow(table)
    blocks = [table.slice(i, rows_per_block) for i in range(0, n, rows_per_block)]
    return ray.data.from_arrow(blocks)


def decode_stage(
    ds,
    *,
    size: tuple[int, int],
    resize_mode: str = "resize",
    interpolation: str = "bilinear",
    batch_size: int = 32,
    num_cpus: float = 1.0,
    workers: int = 1,
    mode: str = "actors",
    read_threads: int = 8,
):
    """``ds`` (manifest rows) -> decoded images, on at most ``workers`` decoders.

    Why actors by default: each Ray task needs a worker lease, and when a task waits on a
    slow consumer or the machine is busy Ray starts yet another worker process for the
    next one; measured on 2 cores under load, a 2000-image run started 13-18 worker
    processes at ~1.2 CPU-s of Python start-up each, about a fifth of the pipeline's CPU.
    A decoder actor is started once (and keeps its read threads).
    """
    import ray.data

    kwargs = dict(size=tuple(size), resize_mode=resize_mode, interpolation=interpolation)
    common = dict(batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus)
    if mode == "actors":
        return ds.map_batches(
            Decoder,
            fn_constructor_kwargs=dict(kwargs, read_threads=read_threads),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)),
            **common,
        )
    if mode != "tasks":
        raise ValueError(f"decode mode must be actors or tasks, got {mode!r}")
    return ds.map_batches(
        load_batch,
        fn_kwargs=dict(kwargs, read_threads=read_threads),
        compute=ray.data.TaskPoolStrategy(size=max(1, workers)),
        **common,
    )


def image_dataset(
    manifest: Manifest | pa.Table,
    *,
    size: tuple[int, int],
    resize_mode: str = "resize",
    interpolation: str = "bilinear",
    batch_size: int = 32,
    rows_per_block: int = 128,
    num_cpus: float = 1.0,
    workers: int = 0,
    mode: str = "tasks",
    read_threads: int = 8,
):
    """Manifest rows -> Ray Dataset with ``image`` (uint8 HxWx3) and ``error`` columns,
    decoded by ``decode_stage`` on at most ``workers`` decoders (0: one per block, at
    most 8). Tasks by default: they hand their CPUs back between batches, which a
    training run beside them needs; ``mode="actors"`` as in embedding."""
    table = manifest.table if isinstance(manifest, Manifest) else manifest
    ds = manifest_dataset(table, rows_per_block=rows_per_block)
    n_blocks = max(1, math.ceil(table.num_rows / rows_per_block))
    return decode_stage(
        ds,
        size=size,
        resize_mode=resize_mode,
        interpolation=interpolation,
        batch_size=batch_size,
        num_cpus=num_cpus,
        workers=workers or min(8, n_blocks),
        mode=mode,
        read_threads=read_threads,
    )
