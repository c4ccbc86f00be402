"""Storage: one place that turns a path (local or ``s3://``) into a filesystem.

Every stage reads and writes through these helpers so that local folders and object
stores behave the same. S3 settings come from the standard AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for S3-compatible
servers such as MinIO, Ceph or a test server).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "memory://")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def s3_options() -> dict[str, Any]:
    """fsspec options for s3fs, read from the environment at call time."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    return opts


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path as that filesystem spells it."""
    path = str(path)
    if path.startswith("s3://"):
        fs = fsspec.filesystem("s3", **s3_options())
        return fs, path[len("s3://") :]
    if is_remote(path):
        fs, _, paths = fsspec.get_fs_token_paths(path)
        return fs, paths[0]
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


def arrow_filesystem(path: str):
    """A pyarrow filesystem and bare path for ``path``: what Ray Data's readers/writers take."""
    import pyarrow.fs as pafs

    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    fs, bare = filesystem(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), bare


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    path = str(path)
    if is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(path))


def resolve(path: str, base_dir: str) -> str:
    """Resolve ``path`` relative to ``base_dir`` unless it is absolute or remote."""
    path = str(path).strip()
    if is_remote(path) or os.path.isabs(path):
        return path
    return join(base_dir, path)


def exists(path: str) -> bool:
    fs, bare = filesystem(path)
    return fs.exists(bare)


def read_bytes(path: str) -> bytes:
    fs, bare = filesystem(path)
    with fs.open(bare, "rb") as f:
        return f.read()


def makedirs(path: str) -> None:
    fs, bare = filesystem(path)
    if not is_remote(path):
        fs.makedirs(bare, exist_ok=True)


def check_writable(path: str, what: str = "--out") -> None:
    """Fail fast, before any work, when the folder ``path`` cannot be written: a missing
    bucket, refused credentials or a read-only folder end a job at its last step
    otherwise. Locally the folder is created; on an object store a probe object is
    written and removed. Raises :class:`~reid_ray.errors.StorageError` (one line)."""
    from reid_ray.errors import StorageError, user_message

    path = str(path)
    try:
        fs, bare = filesystem(path)
        if not is_remote(path):
            if os.path.exists(bare) and not os.path.isdir(bare):
                raise StorageError(f"{what} {path} is a file, not a folder")
            os.makedirs(bare, exist_ok=True)
            if not os.access(bare, os.W_OK):
                raise StorageError(f"{what} {path}: permission denied (folder not writable)")
            return
        bucket = bare.split("/", 1)[0]
        if not fs.exists(bucket):
            raise StorageError(
                f"{what} {path}: bucket {bucket!r} not found (create it, or check the path and "
                "AWS_ENDPOINT_URL)"
            )
        probe = posixpath.join(bare, f".reid-ray-write-test-{uuid.uuid4().hex[:8]}")
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any storage failure becomes one line
        message = user_message(exc)
        if message is None:
            raise
        raise StorageError(f"{what} {path} cannot be written: {message}") from exc


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never half.

    Locally: a temporary sibling renamed into place. On object stores a single PUT is
    already atomic.
    """
    fs, bare = filesystem(path)
    if is_remote(path):
        with fs.open(bare, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(bare), exist_ok=True)
    tmp = f"{bare}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, bare)


def json_safe(obj: Any) -> Any:
    """NaN/inf become null and numpy scalars plain numbers, so the file is strict JSON."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str, obj: Any) -> None:
    """Strict JSON (NaN as null), written atomically."""
    text = json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode())


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_table_atomic(path: str, table) -> None:
    """Write one Arrow table as a Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def list_files(path: str, suffix: str = "") -> list[str]:
    """Files directly under ``path`` ending with ``suffix``, as full paths (sorted)."""
    fs, bare = filesystem(path)
    if not fs.exists(bare):
        return []
    out = []
    for info in fs.ls(bare, detail=True):
        name = info["name"]
        if info.get("type") == "file" and name.endswith(suffix):
            out.append(f"{path.split('://', 1)[0]}://{name}" if is_remote(path) else name)
    return sorted(out)


def remove(path: str, recursive: bool = False) -> None:
    fs, bare = filesystem(path)
    if fs.exists(bare):
        fs.rm(bare, recursive=recursive)
