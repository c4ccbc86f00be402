"""The embeddings output on disk (local or ``s3://``), written so a crash never corrupts it.

Layout of an embed output folder::

    OUT/embeddings/part-<run>-<seq>.parquet   image_id, embedding list<float32>, model
    OUT/errors/part-<run>-<seq>.parquet       image_id, path, stage, reason
    OUT/manifest.json                         what produced it; written last

Every part is written whole and renamed into place (``reid_ray.io.write_table_atomic``), so
a listed ``.parquet`` part is always complete; a job killed mid-write leaves at most a
``.tmp-`` file, which readers ignore and the next run removes. ``model`` holds the
embedding key (model fingerprint, plus test-time augmentation), so vectors of different
models are never mixed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.data.manifest import ERRORS_SCHEMA, errors_table
from reid_ray.errors import ConfigError, OutputError

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
ERRORS_DIR = "errors"
MANIFEST_FILE = "manifest.json"
PART_SUFFIX = ".parquet"

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


def table_to_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """The ``embedding`` list column as a [N, D] float32 array (all rows the same length)."""
    import pyarrow.compute as pc

    col = table.column(column).combine_chunks() if table.num_rows else None
    if col is None:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise OutputError("embeddings of different lengths in one table: mixed models?")
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(lengths), int(lengths[0]) if len(lengths) else 0)


def embeddings_dir(path: str) -> str:
    """The folder holding the parts: ``path/embeddings`` for an embed output folder (or an
    evaluate folder's ``embed/``), else ``path`` itself when it holds parts directly."""
    for candidate in (rio.join(path, EMBEDDINGS_DIR), rio.join(path, "embed", EMBEDDINGS_DIR)):
        if list_parts(candidate):
            return candidate
    if list_parts(path):
        return path
    return rio.join(path, EMBEDDINGS_DIR)


def list_parts(folder: str) -> list[str]:
    """Complete parts in ``folder`` (temporary files are never listed)."""
    fs, bare = rio.filesystem(folder)
    if rio.is_remote(folder):
        fs.invalidate_cache(bare)
    return [p for p in rio.list_files(folder, PART_SUFFIX) if ".tmp-" not in p.rsplit("/", 1)[-1]]


def read_part(path: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    fs, bare = rio.filesystem(path)
    try:
        with fs.open(bare, "rb") as f:
            return pq.read_table(f, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise OutputError(f"cannot read {path}: {exc}") from None


def remove_temporary(folder: str) -> int:
    """Delete ``*.tmp-*`` leftovers of a killed writer (local folders only)."""
    if rio.is_remote(folder):
        return 0
    fs, bare = rio.filesystem(folder)
    if not fs.exists(bare):
        return 0
    n = 0
    for info in fs.ls(bare, detail=True):
        if ".tmp-" in info["name"].rsplit("/", 1)[-1]:
            fs.rm(info["name"])
            n += 1
    return n


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
    ids_by_key: dict[str, set[str]] = {}
    parts = list_parts(rio.join(out, EMBEDDINGS_DIR))
    for part in parts:
        table = read_part(part, columns=["image_id", "model"])
        for key, image_id in zip(
            table.column("model").to_pylist(), table.column("image_id").to_pylist(), strict=True
        ):
            ids_by_key.setdefault(key, set()).add(image_id)
    return ExistingEmbeddings(ids_by_key, len(parts))


class PartWriter:
    """Buffers embedding and error rows; writes them as atomic parts.

    A part is written when ``rows_per_part`` embeddings are buffered or ``flush_seconds``
    have passed since the last write, and on ``close``. Part names carry a per-run id, so
    a rerun never overwrites an earlier run's parts.
    """

    def __init__(
        self, out: str, key: str, *, rows_per_part: int = 2048, flush_seconds: float = 60.0
    ) -> None:
        self.out = out
        self.key = key
        self.rows_per_part = int(rows_per_part)
        self.flush_seconds = float(flush_seconds)
        self.run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.seq = 0
        self._tables: list[pa.Table] = []
        self._errors: list[dict] = []
        self._buffered = 0
        self._last = time.monotonic()
        self.n_embedded = 0
        self.n_errors = 0
        self.parts: list[str] = []

    def add(self, batch: dict[str, np.ndarray]) -> tuple[int, int]:
        """Add one Embedder output batch; returns (embedded, errors) in it."""
        errors = np.asarray(batch["error"], dtype=object)
        ok = np.array([not e for e in errors], dtype=bool)
        ids = np.asarray(batch["image_id"], dtype=object)
        if ok.any():
            self._tables.append(
                embeddings_table(ids[ok], np.asarray(batch["embedding"])[ok], self.key)
            )
            self._buffered += int(ok.sum())
        stages = batch.get("stage")
        paths = batch.get("path")
        for i in np.flatnonzero(~ok):
            self._errors.append(
                dict(
                    image_id=ids[i],
                    path=None if paths is None else paths[i],
                    stage=(str(stages[i]) if stages is not None else "") or "decode",
                    reason=str(errors[i]),
                )
            )
        if self._buffered >= self.rows_per_part or (
            time.monotonic() - self._last >= self.flush_seconds and (self._buffered or self._errors)
        ):
            self.flush()
        return int(ok.sum()), int((~ok).sum())

    def add_errors(self, table: pa.Table) -> None:
        """Errors found before the pipeline (e.g. manifest rows): written with the next part."""
        self._errors.extend(table.to_pylist())

    def flush(self) -> None:
        if not self._tables and not self._errors:
            return
        name = f"part-{self.run}-{self.seq:05d}{PART_SUFFIX}"
        # errors first: a part of embeddings is the resume unit, errors are recomputed
        if self._errors:
            rio.write_table_atomic(rio.join(self.out, ERRORS_DIR, name), errors_table(self._errors))
            self.n_errors += len(self._errors)
        if self._tables:
            table = pa.concat_tables(self._tables)
            rio.write_table_atomic(rio.join(self.out, EMBEDDINGS_DIR, name), table)
            self.n_embedded += table.num_rows
            self.parts.append(name)
        logger.debug(
            "wrote part %s (%d embeddings, %d errors)", name, self._buffered, len(self._errors)
        )
        self.seq += 1
        self._tables, self._errors, self._buffered = [], [], 0
        self._last = time.monotonic()

    def close(self) -> None:
        self.flush()


def iter_parts(path: str, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(part path, table) for every embeddings part under ``path`` (an embed output)."""
    for part in list_parts(embeddings_dir(path)):
        yield part, read_part(part, columns)


def read_errors(path: str) -> pa.Table:
    """Every error row of an embed output (empty table when there are none)."""
    tables = [read_part(p) for p in list_parts(rio.join(path, ERRORS_DIR))]
    if not tables:
        return ERRORS_SCHEMA.empty_table()
    return pa.concat_tables([t.cast(ERRORS_SCHEMA) for t in tables])


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
    wanted = None if ids is None else [str(i) for i in ids]
    wanted_set = None if wanted is None else pa.array(sorted(set(wanted)), pa.string())
    keys: set[str] = set()
    id_chunks: list[np.ndarray] = []
    mats: list[np.ndarray] = []
    n_parts = 0
    for _, table in iter_parts(path):
        n_parts += 1
        keys.update(table.column("model").unique().to_pylist())
        if wanted_set is not None:
            import pyarrow.compute as pc

            table = table.filter(pc.is_in(table["image_id"], value_set=wanted_set))
        if table.num_rows:
            id_chunks.append(np.asarray(table.column("image_id").to_pylist(), dtype=object))
            mats.append(table_to_matrix(table))
    if n_parts == 0:
        raise OutputError(f"no embeddings under {path}: run `reid-ray embed --out {path}` first")
    if len(keys) > 1:
        raise OutputError(f"{path} holds embeddings of {len(keys)} models ({sorted(keys)})")
    key = next(iter(keys))
    all_ids = np.concatenate(id_chunks) if id_chunks else np.zeros(0, dtype=object)
    dims = {m.shape[1] for m in mats}
    if len(dims) > 1:
        raise OutputError(f"{path} holds embeddings of different sizes {sorted(dims)}")
    matrix = np.concatenate(mats) if mats else np.zeros((0, 0), dtype=np.float32)
    # one row per id (a rerun never duplicates, but be exact for hand-merged folders)
    _, first = np.unique(all_ids.astype(str), return_index=True)
    if len(first) != len(all_ids):
        logger.warning(
            "%s: %d duplicated image_id(s); keeping the first", path, len(all_ids) - len(first)
        )
        first.sort()
        all_ids, matrix = all_ids[first], matrix[first]
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
    "MANIFEST_FILE",
    "EmbeddingSet",
    "ExistingEmbeddings",
    "PartWriter",
    "embeddings_dir",
    "embeddings_table",
    "iter_parts",
    "list_parts",
    "read_embeddings",
    "read_errors",
    "read_part",
    "remove_temporary",
    "scan_existing",
    "table_to_matrix",
]
