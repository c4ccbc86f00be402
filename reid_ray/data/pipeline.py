"""Ray Data wiring for images: manifest rows -> decoded, cropped, resized uint8 arrays.

The decode step is a plain function over one batch (``load_batch``), mapped in CPU tasks;
a row that fails keeps its place with a zero image and its ``error`` reason, so the stage
downstream counts it and writes it to the errors table instead of losing it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa

from reid_ray.data.images import load_image, resize_image
from reid_ray.data.manifest import Manifest
from reid_ray.errors import ImageError

logger = logging.getLogger(__name__)

PASS_THROUGH = ("image_id", "path", "identity", "species", "viewpoint")


def load_batch(
    batch: dict[str, np.ndarray],
    *,
    size: tuple[int, int],
    resize_mode: str = "resize",
    interpolation: str = "bilinear",
) -> dict[str, np.ndarray]:
    """Read and decode one batch of manifest rows; failures become ``error`` reasons."""
    n = len(batch["image_id"])
    images = np.zeros((n, size[0], size[1], 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    bboxes = batch.get("bbox")
    for i in range(n):
        bbox = None
        if bboxes is not None and bboxes[i] is not None:
            bbox = [float(v) for v in bboxes[i]]
            if any(math.isnan(v) for v in bbox):
                bbox = None
        try:
            img = load_image(str(batch["path"][i]), bbox)
            images[i] = resize_image(img, size, resize_mode, interpolation)
        except ImageError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must not kill the batch
            errors[i] = f"unexpected {type(exc).__name__}: {exc}"
    out = {k: np.asarray(batch[k], dtype=object) for k in PASS_THROUGH if k in batch}
    out["image"] = images
    out["error"] = errors.astype(str)
    return out


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


def image_dataset(
    manifest: Manifest | pa.Table,
    *,
    size: tuple[int, int],
    resize_mode: str = "resize",
    interpolation: str = "bilinear",
    batch_size: int = 32,
    rows_per_block: int = 128,
    num_cpus: float = 1.0,
):
    """Manifest rows -> Ray Dataset with ``image`` (uint8 HxWx3) and ``error`` columns."""
    ds = manifest_dataset(manifest, rows_per_block=rows_per_block)
    return ds.map_batches(
        load_batch,
        fn_kwargs=dict(size=tuple(size), resize_mode=resize_mode, interpolation=interpolation),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
    )
