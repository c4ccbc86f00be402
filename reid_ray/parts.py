"""One Parquet parts store and one run record for every stage (local folders or ``s3://``).

A stage output is a folder of *part folders* (``embeddings/``, ``errors/``, ``pairs/``,
``candidates/`` ...) each holding ``part-<run>-<seq>.parquet`` files, plus a run record
``manifest.json`` written last::

    OUT/<table>/part-<run>-<seq>.parquet
    OUT/manifest.json        what produced it (command, config, counts, timings)

Every part is written whole and renamed into place (``reid_ray.io.write_table_atomic``):
a listed part is always complete, a killed writer leaves at most a ``.tmp-`` file that
readers skip and :func:`remove_temporary` deletes. Part names carry a per-run id, so a
rerun never overwrites an earlier run's parts (resume = skip what the parts hold).

Reading goes through ``pyarrow.dataset`` (column projection and filters pushed into the
scan; the same code for local folders and object stores).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from reid_ray import io as rio
from reid_ray.errors import OutputError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
PART_SUFFIX = ".parquet"


def new_run_id() -> str:
    """A sortable, unique id for one run's parts."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def part_name(run: str, seq: int) -> str:
    return f"part-{run}-{seq:05d}{PART_SUFFIX}"


def list_parts(folder: str) -> list[str]:
    """Complete parts in ``folder``, sorted (temporary files are never listed)."""
    if rio.is_remote(folder):
        fs, bare = rio.filesystem(folder)
        fs.invalidate_cache(bare)
    return [p for p in rio.list_files(folder, PART_SUFFIX) if ".tmp-" not in p.rsplit("/", 1)[-1]]


def write_part(
    folder: str, table: pa.Table, *, run: str | None = None, seq: int = 0, name: str | None = None
) -> str:
    """Write ``table`` as one atomic part in ``folder``; returns its path."""
    path = rio.join(folder, name or part_name(run or new_run_id(), seq))
    rio.write_table_atomic(path, table)
    return path


def read_part(path: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    fs, bare = rio.arrow_filesystem(path)
    try:
        return pq.read_table(bare, filesystem=fs, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise OutputError(f"cannot read {path}: {exc}") from None


def dataset(folder: str, schema: pa.Schema | None = None, files: list[str] | None = None):
    """A ``pyarrow.dataset.Dataset`` over the complete parts of ``folder`` (or ``files``)."""
    import pyarrow.dataset as pads

    files = list_parts(folder) if files is None else files
    fs, _ = rio.arrow_filesystem(folder)
    bare = [rio.arrow_filesystem(f)[1] for f in files]
    return pads.dataset(bare, schema=schema, format="parquet", filesystem=fs)


def read_parts(
    folder: str,
    schema: pa.Schema | None = None,
    columns: list[str] | None = None,
    filter: Any = None,  # noqa: A002 - pyarrow's name
    files: list[str] | None = None,
) -> pa.Table:
    """Every row of the parts in ``folder`` (an empty ``schema`` table when there are none)."""
    files = list_parts(folder) if files is None else files
    if not files:
        if schema is None:
            return pa.table({})
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    try:
        return dataset(folder, schema, files).to_table(columns=columns, filter=filter)
    except (OSError, pa.ArrowInvalid) as exc:
        raise OutputError(f"cannot read the parts in {folder}: {exc}") from None


def iter_batches(
    folder: str,
    schema: pa.Schema | None = None,
    columns: list[str] | None = None,
    batch_size: int = 65536,
) -> Iterator[pa.RecordBatch]:
    """Stream the rows of ``folder``'s parts in record batches (bounded memory)."""
    files = list_parts(folder)
    if not files:
        return
    yield from dataset(folder, schema, files).to_batches(columns=columns, batch_size=batch_size)


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


class PartsWriter:
    """Buffers Arrow tables for one part folder; writes a part every ``rows_per_part``
    rows or ``flush_seconds``, and on :meth:`close`."""

    def __init__(
        self,
        folder: str,
        schema: pa.Schema | None = None,
        *,
        rows_per_part: int = 65536,
        flush_seconds: float = 60.0,
        run: str | None = None,
    ) -> None:
        self.folder = folder
        self.schema = schema
        self.rows_per_part = int(rows_per_part)
        self.flush_seconds = float(flush_seconds)
        self.run = run or new_run_id()
        self.seq = 0
        self.n_rows = 0
        self.parts: list[str] = []
        self._tables: list[pa.Table] = []
        self._buffered = 0
        self._last = time.monotonic()

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._tables.append(table.cast(self.schema) if self.schema is not None else table)
        self._buffered += table.num_rows
        if (
            self._buffered >= self.rows_per_part
            or time.monotonic() - self._last >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> str | None:
        if not self._tables:
            return None
        table = pa.concat_tables(self._tables)
        path = write_part(self.folder, table, run=self.run, seq=self.seq)
        logger.debug("wrote %s (%d rows)", path, table.num_rows)
        self.seq += 1
        self.n_rows += table.num_rows
        self.parts.append(path)
        self._tables, self._buffered = [], 0
        self._last = time.monotonic()
        return path

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> PartsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        # keep what is complete even on failure: a rerun resumes after it
        self.close()


# -- run records ---------------------------------------------------------------------------


def run_record(
    command: str,
    *,
    config: Any = None,
    counts: dict[str, Any] | None = None,
    timings: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The standard ``manifest.json`` content: what produced an output and what it holds."""
    import dataclasses

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    record: dict[str, Any] = {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if config is not None:
        record["config"] = config
    if counts is not None:
        record["counts"] = counts
    if timings is not None:
        record["timings"] = timings
    record.update(extra)
    return record


def write_run_record(out: str, command: str, *, name: str = MANIFEST_FILE, **fields: Any) -> dict:
    """Write :func:`run_record` atomically as ``out/<name>`` (last, so its presence means
    the output is complete). Returns the record."""
    record = run_record(command, **fields)
    rio.write_json_atomic(rio.join(out, name), record)
    return record


def read_run_record(out: str, name: str = MANIFEST_FILE) -> dict | None:
    """The run record of ``out``, or None when the output is absent or incomplete."""
    path = rio.join(out, name)
    if not rio.exists(path):
        return None
    return rio.read_json(path)


__all__ = [
    "MANIFEST_FILE",
    "PART_SUFFIX",
    "PartsWriter",
    "dataset",
    "iter_batches",
    "list_parts",
    "new_run_id",
    "part_name",
    "read_part",
    "read_parts",
    "read_run_record",
    "remove_temporary",
    "run_record",
    "write_part",
    "write_run_record",
]
