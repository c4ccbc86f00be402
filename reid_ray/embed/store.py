"""The embeddings output on disk (local or ``s3://``): the embedding-specific layer over
:mod:`reid_ray.parts` (which owns part files, atomic writes, listing and reading).

Layout of an embed output folder::

    OUT/embeddings/part-<run>-<seq>.parquet   image_id, embedding list<float32>, model
    OUT/errors/part-<run>-<seq>.parquet       image_id, path, stage, reason
    OUT/manifest.json                         the run record; written last

``model`` holds the embedding key (model fingerprint, plus test-time augmentation), so
vectors of different models are never mixed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray import parts
from reid_ray.data.manifest import ERRORS_SCHEMA, errors_table
from reid_ray.errors import ConfigError, OutputError

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
ERRORS_DIR = "errors"

EMBEDDINGS_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("embedding", pa.list_(pa.float32())), ("model", pa.string())]
)


def embeddings_table(ids: Iterable[str], matrix: np.ndarray, key: str) -> pa.Table:
    """ids [N] and matrix [N, D] float32 -> an embeddings table (every row keyed ``key``)."""
    ids = [str(i) for i in ids]
    matrix = np.ascontiguousarray(np.asarray(matrix, dtype=np.float32))
    if matrix.ndim != 2 or matrix.shape[0] != len(ids):
        raise ConfigError(f"matrix must have shape ({len(ids)}, D), got {matrix.shape}")
    n, d = matrix.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32) if n else [0], pa.int32())
    values = pa.array(matrix.reshape(-1), pa.float32())
    embedding = pa.ListArray.from_arrays(offsets, values)
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "embedding": embedding,
            "model": pa.array([key] * n, pa.string()),
        },
        schema=EMBEDDINGS_SCHEMA,
    )


def table_to_matrix(table: pa.Table | pa.RecordBatch, column: str = "embedding") -> np.ndarray:
    """The ``embedding`` list column as a [N, D] float32 array (all rows the same length)."""
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return np.zeros((0, 0), dtype=np.float32)
    col = table.column(column)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any():
        raise OutputError("embeddings of different lengths in one table: mixed models?")
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(lengths), int(lengths[0]))


def embeddings_dir(path: str) -> str:
    """The folder holding the parts: ``path/embeddings`` for an embed output folder (or an
    evaluate folder's ``embed/``), else ``path`` itself when it holds parts directly."""
    for candidate in (rio.join(path, EMBEDDINGS_DIR), rio.join(path, "embed", EMBEDDINGS_DIR)):
        if parts.list_parts(candidate):
            return candidate
    if parts.list_parts(path):
        return path
    return rio.join(path, EMBEDDINGS_DIR)


@dataclass
class ExistingEmbeddings:
    """What an output folder already holds: ids per embedding key."""

    ids_by_key: dict[str, set[str]]
    n_parts: int

    @property
    def keys(self) -> set[str]:
        return set(self.ids_by_key)

    def ids(self, key: str) -> set[str]:
        return self.ids_by_key.get(key, set())


def scan_existing(out: str) -> ExistingEmbeddings:
    """Ids and keys already embedded under ``out`` (reads only the id and model columns)."""
    folder = rio.join(out, EMBEDDINGS_DIR)
    files = parts.list_parts(folder)
    ids_by_key: dict[str, set[str]] = {}
    if files:
        table = parts.read_parts(folder, EMBEDDINGS_SCHEMA, ["image_id", "model"], files=files)
        for key, image_id in zip(
            table.column("model").to_pylist(), table.column("image_id").to_pylist(), strict=True
        ):
            ids_by_key.setdefault(key, set()).add(image_id)
    return ExistingEmbeddings(ids_by_key, len(files))


def write_batch_parts(
    out: str, key: str, batch: dict[str, np.ndarray], *, run: str | None = None
) -> tuple[int, int, list[dict]]:
    """Write one batch of Embedder output (``image_id``, ``embedding``, ``error``, and
    optionally ``path``, ``stage``) as a part of ``out/embeddings`` and its failed rows as
    a part of ``out/errors``, under one part name (errors first: the embeddings part is the
    resume unit). Returns (embedded, errors, the error rows)."""
    errors = np.asarray(batch["error"], dtype=object)
    ok = np.array([not e for e in errors], dtype=bool)
    ids = np.asarray(batch["image_id"], dtype=object)
    stages, paths = batch.get("stage"), batch.get("path")
    error_rows = [
        dict(
            image_id=str(ids[i]),
            path=None if paths is None or paths[i] is None else str(paths[i]),
            stage=(str(stages[i]) if stages is not None else "") or "decode",
            reason=str(errors[i]),
        )
        for i in np.flatnonzero(~ok)
    ]
    name = parts.part_name(run or parts.new_run_id(), 0)
    if error_rows:
        parts.write_part(rio.join(out, ERRORS_DIR), errors_table(error_rows), name=name)
    if ok.any():
        table = embeddings_table(ids[ok], np.asarray(batch["embedding"])[ok], key)
        parts.write_part(rio.join(out, EMBEDDINGS_DIR), table, name=name)
    logger.debug("wrote part %s (%d embeddings, %d errors)", name, ok.sum(), len(error_rows))
    return int(ok.sum()), len(error_rows), error_rows


def write_errors(out: str, table: pa.Table) -> None:
    """Errors found before the pipeline (e.g. the manifest's rejects) as one part."""
    if table.num_rows:
        parts.write_part(rio.join(out, ERRORS_DIR), table.cast(ERRORS_SCHEMA))


def iter_embedding_batches(
    path: str, columns: list[str] | None = None, batch_size: int = 65536
) -> Iterator[pa.RecordBatch]:
    """Stream the embeddings of an embed output (bounded memory)."""
    yield from parts.iter_batches(
        embeddings_dir(path), EMBEDDINGS_SCHEMA, columns=columns, batch_size=batch_size
    )


def read_errors(path: str) -> pa.Table:
    """Every error row of an embed output (empty table when there are none)."""
    return parts.read_parts(rio.join(path, ERRORS_DIR), ERRORS_SCHEMA)


@dataclass
class EmbeddingSet:
    """Embeddings in memory: ``ids`` [N] (object), ``matrix`` [N, D] float32, their ``key``."""

    ids: np.ndarray
    matrix: np.ndarray
    key: str

    def __len__(self) -> int:
        return len(self.ids)


def read_embeddings(path: str, ids: Iterable[str] | None = None) -> EmbeddingSet:
    """Read an embed output's vectors, all of them or only ``ids`` (in the order given;
    ids without an embedding are left out: compare lengths to find them).

    Raises ``OutputError`` when the folder holds no embeddings or vectors of several models.
    """
    import pyarrow.dataset as pads

    wanted = None if ids is None else [str(i) for i in ids]
    folder = embeddings_dir(path)
    files = parts.list_parts(folder)
    if not files:
        raise OutputError(f"no embeddings under {path}: run `reid-ray embed --out {path}` first")
    where = None
    if wanted is not None:
        where = pads.field("image_id").isin(pa.array(sorted(set(wanted)), pa.string()))
    table = parts.read_parts(folder, EMBEDDINGS_SCHEMA, filter=where, files=files)
    keys = set(table.column("model").unique().to_pylist())
    if len(keys) > 1:
        raise OutputError(f"{path} holds embeddings of {len(keys)} models ({sorted(keys)})")
    if not keys:  # none of the wanted ids: the model is still the folder's
        first = parts.read_part(files[0], columns=["model"]).column("model")
        keys = {first[0].as_py()} if len(first) else {""}
    key = next(iter(keys))
    all_ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    matrix = table_to_matrix(table) if table.num_rows else np.zeros((0, 0), np.float32)
    # one row per id (a rerun never duplicates, but be exact for hand-merged folders)
    _, first_pos = np.unique(all_ids.astype(str), return_index=True)
    if len(first_pos) != len(all_ids):
        logger.warning(
            "%s: %d duplicated image_id(s); keeping the first", path, len(all_ids) - len(first_pos)
        )
        first_pos.sort()
        all_ids, matrix = all_ids[first_pos], matrix[first_pos]
    if wanted is not None:
        pos = {i: n for n, i in enumerate(all_ids.tolist())}
        order = [pos[i] for i in wanted if i in pos]
        all_ids, matrix = all_ids[order], matrix[order]
    return EmbeddingSet(all_ids, matrix, key)


__all__ = [
    "EMBEDDINGS_DIR",
    "EMBEDDINGS_SCHEMA",
    "ERRORS_DIR",
    "ERRORS_SCHEMA",
    "EmbeddingSet",
    "ExistingEmbeddings",
    "embeddings_dir",
    "embeddings_table",
    "iter_embedding_batches",
    "read_embeddings",
    "read_errors",
    "scan_existing",
    "table_to_matrix",
    "write_batch_parts",
    "write_errors",
]
