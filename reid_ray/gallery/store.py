"""The versioned gallery folder (local or ``s3://``): immutable parts, versions, CURRENT.

Layout::

    G/parts/<version>-<run>.parquet  image_id, identity, embedding, model, path, added_in, source
    G/versions/v0001/index/          FAISS index of every image of the version (save_index)
    G/versions/v0001/identities.parquet   identity, n_images
    G/versions/v0001/calibration.json     known-vs-new threshold and score -> probability
    G/versions/v0001/gallery.json         written last: model, parts, parent, counts, merges
    G/CURRENT                             the name of the current version, one atomic write

Why this shape: a version lists the parts it holds, and parts are never rewritten, so a new
version adds one part instead of copying the gallery. A version is complete when its
``gallery.json`` exists, and current only once ``CURRENT`` names it (a single atomic write,
also on object stores): a crash at any step leaves the previous version current and
usable, and the next writer removes the incomplete folder. One writer at a time.

Failure injection for tests: ``REID_RAY_GALLERY_FAIL_AT`` = ``after-parts``,
``after-index`` or ``before-current`` makes :func:`write_version` raise at that step.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray import parts as rparts
from reid_ray.data.manifest import BBOX_TYPE
from reid_ray.errors import ConfigError, OutputError

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
PARTS_DIR = "parts"
VERSION_FILE = "gallery.json"
FAIL_ENV = "REID_RAY_GALLERY_FAIL_AT"
FAIL_POINTS = ("after-parts", "after-index", "before-current")
_NAME = re.compile(r"^v(\d{4,})$")

GALLERY_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("identity", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("path", pa.string()),
        ("added_in", pa.string()),
        ("source", pa.string()),
        # the image's box (x, y, w, h), null for whole images: re-ranking crops to it as the
        # embedding did (older versions' parts lack the column and read as null)
        ("bbox", BBOX_TYPE),
    ]
)


@dataclass
class GalleryVersion:
    """One complete version: its folder and its ``gallery.json``."""

    root: str
    name: str
    info: dict[str, Any]

    @property
    def folder(self) -> str:
        return rio.join(self.root, VERSIONS_DIR, self.name)

    @property
    def key(self) -> str:
        return self.info["model"]["key"]

    @property
    def model_ref(self) -> str:
        return self.info["model"]["ref"]

    @property
    def part_paths(self) -> list[str]:
        return [rio.join(self.root, p) for p in self.info["parts"]]

    def calibration(self) -> dict[str, Any]:
        return rio.read_json(rio.join(self.folder, "calibration.json"))

    def index_folder(self) -> str:
        return rio.join(self.folder, "index")


def version_name(n: int) -> str:
    return f"v{n:04d}"


def fail_point(step: str, env: str = FAIL_ENV) -> None:
    """Tests set ``env`` to a step name to crash a job there (merge: ``FAIL_POINTS``)."""
    if os.environ.get(env) == step:
        raise RuntimeError(f"injected failure at {step} ({env})")


def _version_dirs(root: str) -> list[str]:
    folder = rio.join(root, VERSIONS_DIR)
    fs, bare = rio.filesystem(folder)
    if rio.is_remote(folder):
        fs.invalidate_cache(bare)
    if not fs.exists(bare):
        return []
    names = [info["name"].rstrip("/").rsplit("/", 1)[-1] for info in fs.ls(bare, detail=True)]
    return sorted(n for n in names if _NAME.match(n))


def is_gallery(root: str) -> bool:
    return rio.exists(rio.join(root, CURRENT_FILE))


def open_version(root: str, name: str | None = None) -> GalleryVersion:
    """The version ``name`` of the gallery at ``root`` (default: the current one)."""
    if name is None:
        current = rio.join(root, CURRENT_FILE)
        if not rio.exists(current):
            raise OutputError(
                f"{root} is not a gallery (no {CURRENT_FILE}): build one with "
                "`reid-ray gallery build --manifest M --model REF --out G`"
            )
        name = rio.read_bytes(current).decode().strip()
    path = rio.join(root, VERSIONS_DIR, name, VERSION_FILE)
    if not _NAME.match(name) or not rio.exists(path):
        raise OutputError(f"gallery {root} has no complete version {name!r}")
    return GalleryVersion(root, name, rio.read_json(path))


def history(root: str) -> list[dict[str, Any]]:
    """Every complete version, oldest first, with what produced it; ``current`` marked."""
    current = open_version(root).name if is_gallery(root) else None
    if current is None and not _version_dirs(root):
        open_version(root)  # not a gallery at all: its one-line error, not an empty history
    out = []
    for name in _version_dirs(root):
        path = rio.join(root, VERSIONS_DIR, name, VERSION_FILE)
        if not rio.exists(path):
            continue
        info = rio.read_json(path)
        out.append(
            {
                "version": name,
                "current": name == current,
                "created": info.get("created"),
                "parent": info.get("parent"),
                "operation": info.get("operation"),
                "counts": info.get("counts", {}),
                "merged": info.get("merged", []),
            }
        )
    return out


def set_current(root: str, name: str) -> GalleryVersion:
    """Point ``CURRENT`` at the complete version ``name`` (roll back or forward)."""
    version = open_version(root, name)
    rio.write_bytes_atomic(rio.join(root, CURRENT_FILE), (name + "\n").encode())
    logger.info("gallery %s: current version is now %s", root, name)
    return version


def read_table(version: GalleryVersion, columns: list[str] | None = None) -> pa.Table:
    """Every row of a version (its parts), optionally only ``columns``."""
    return rparts.read_parts(
        rio.join(version.root, PARTS_DIR), GALLERY_SCHEMA, columns, files=version.part_paths
    )


def gallery_table(
    ids,
    identities,
    embeddings: np.ndarray,
    key: str,
    paths,
    added_in: str,
    source: str,
    bboxes=None,
) -> pa.Table:
    """Rows of a new part (``embeddings`` [N, D] float32, L2-normalised; ``bboxes``: one
    ``[x, y, w, h]`` or None per row, None for all whole images)."""
    from reid_ray.embed.store import embeddings_table

    emb = embeddings_table(ids, embeddings, key)
    n = emb.num_rows
    return pa.table(
        {
            "image_id": emb["image_id"],
            "identity": pa.array([str(i) for i in identities], pa.string()),
            "embedding": emb["embedding"],
            "model": emb["model"],
            "path": pa.array([None if p is None else str(p) for p in paths], pa.string()),
            "added_in": pa.array([added_in] * n, pa.string()),
            "source": pa.array([source] * n, pa.string()),
            "bbox": pa.array(
                [None] * n if bboxes is None else list(bboxes),
                BBOX_TYPE,
            ),
        },
        schema=GALLERY_SCHEMA,
    )


def by_image_id(table: pa.Table, column: str) -> dict:
    """``{image_id: value}`` of one column; empty when the table lacks the column."""
    if column not in table.column_names:
        return {}
    return dict(zip(table["image_id"].to_pylist(), table[column].to_pylist(), strict=True))


def _next_name(root: str) -> str:
    """One past every version folder, complete or not; an incomplete last one is reused."""
    names = _version_dirs(root)
    if not names:
        return version_name(1)
    last = names[-1]
    if not rio.exists(rio.join(root, VERSIONS_DIR, last, VERSION_FILE)):
        return last  # left by a crash: rebuilt from scratch below
    return version_name(int(_NAME.match(last).group(1)) + 1)


def _clear_incomplete(root: str, name: str) -> None:
    folder = rio.join(root, VERSIONS_DIR, name)
    if rio.exists(folder):
        logger.warning("gallery %s: removing incomplete version %s left by a crash", root, name)
        rio.remove(folder, recursive=True)
    for part in rparts.list_parts(rio.join(root, PARTS_DIR)):
        if part.rsplit("/", 1)[-1].startswith(f"{name}-"):
            rio.remove(part)
    rparts.remove_temporary(rio.join(root, PARTS_DIR))


def write_version(
    root: str,
    new_rows: pa.Table,
    *,
    parent: GalleryVersion | None,
    model: dict[str, Any],
    calibrate,
    operation: str,
    merged: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> GalleryVersion:
    """Write a new version = ``parent``'s parts + one part of ``new_rows``; make it current.

    ``calibrate(ids, identities, matrix, index) -> dict`` fits the known-vs-new decision of
    the new version. Steps, each one leaving the previous version current if it fails:
    part, index, identities + calibration, ``gallery.json``, ``CURRENT``.
    """
    from reid_ray.embed.store import table_to_matrix
    from reid_ray.index import build_index, save_index

    if new_rows.num_rows == 0:
        raise ConfigError("a new gallery version needs at least one new image")
    name = _next_name(root)
    _clear_incomplete(root, name)
    run = rparts.new_run_id()
    part_rel = f"{PARTS_DIR}/{name}-{run}{rparts.PART_SUFFIX}"
    rows = new_rows.set_column(
        new_rows.schema.get_field_index("added_in"),
        "added_in",
        pa.array([name] * new_rows.num_rows, pa.string()),
    ).cast(GALLERY_SCHEMA)
    rio.write_table_atomic(rio.join(root, part_rel), rows)
    fail_point("after-parts")

    part_list = (list(parent.info["parts"]) if parent else []) + [part_rel]
    files = [rio.join(root, p) for p in part_list]
    table = rparts.read_parts(rio.join(root, PARTS_DIR), GALLERY_SCHEMA, files=files)
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    if len(set(ids.tolist())) != len(ids):
        raise OutputError(f"gallery {root}: version {name} would hold an image twice")
    identities = np.asarray(table.column("identity").to_pylist(), dtype=object)
    matrix = table_to_matrix(table)
    del table
    folder = rio.join(root, VERSIONS_DIR, name)
    index = build_index(matrix, ids, key=model["key"])
    save_index(index, rio.join(folder, "index"), meta={"gallery_version": name})
    fail_point("after-index")

    uniq, counts = np.unique(identities.astype(str), return_counts=True)
    rio.write_table_atomic(
        rio.join(folder, "identities.parquet"),
        pa.table({"identity": pa.array(uniq.tolist(), pa.string()), "n_images": counts}),
    )
    calibration = calibrate(ids, identities, matrix, index)
    rio.write_json_atomic(rio.join(folder, "calibration.json"), calibration)
    info = {
        "format": 1,
        "version": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "operation": operation,
        "parent": parent.name if parent else None,
        "model": model,
        "parts": part_list,
        "counts": {
            "images": int(len(ids)),
            "identities": int(len(uniq)),
            "added": int(rows.num_rows),
        },
        "merged": (list(parent.info.get("merged", [])) if parent else []) + list(merged or []),
        "threshold": calibration.get("threshold"),
        "features_cache": rio.join(root, "features"),
        **(extra or {}),
    }
    rio.write_json_atomic(rio.join(folder, VERSION_FILE), info)
    fail_point("before-current")
    set_current(root, name)
    return GalleryVersion(root, name, info)


__all__ = [
    "CURRENT_FILE",
    "FAIL_ENV",
    "FAIL_POINTS",
    "GALLERY_SCHEMA",
    "GalleryVersion",
    "by_image_id",
    "gallery_table",
    "history",
    "is_gallery",
    "open_version",
    "read_table",
    "set_current",
    "write_version",
]
