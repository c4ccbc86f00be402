"""``gallery merge``: accepted nightly results -> a new gallery version.

Accepted rows are every result of the night (its decision and identity, provisional ids for
new individuals), or, with a reviewed CSV (``OUT/review.csv`` edited by reviewers), the
rows whose ``accept`` is yes, with the ``identity`` the reviewer left or corrected.

Atomic: the new version is written beside the current one and made current last (see
``store.py``); a crash leaves the previous version current. Idempotent: images already in
the gallery are skipped, so merging the same night twice adds nothing the second time (no
new version is written when nothing is new). The vectors come from the night's embed
output, never recomputed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from reid_ray import io as rio
from reid_ray import parts as rparts
from reid_ray.errors import ConfigError, OutputError
from reid_ray.gallery.config import NightlyConfig
from reid_ray.gallery.store import (
    by_image_id,
    gallery_table,
    open_version,
    read_table,
    write_version,
)

logger = logging.getLogger(__name__)

YES = {"yes", "y", "true", "1", "accept", "ok"}
NO = {"no", "n", "false", "0", "reject", ""}


def _results(results_dir: str, key: str) -> tuple[pa.Table, dict[str, Any]]:
    """A complete identify output's results and run record; another model's is refused."""
    record = rparts.read_run_record(results_dir)
    if record is None or record.get("command") != "identify":
        raise OutputError(
            f"{results_dir} is not a complete identify output (no manifest.json): run or "
            "rerun `reid-ray identify` first"
        )
    if record["model"]["key"] != key:
        raise ConfigError(
            f"{results_dir} was identified with model {record['model']['ref']!r} (key "
            f"{record['model']['key']}), the gallery holds key {key}: cannot merge"
        )
    from reid_ray.gallery.identification import RESULTS_SCHEMA

    table = rparts.read_parts(rio.join(results_dir, "results"), RESULTS_SCHEMA)
    return table, record


def read_reviewed(path: str, known_ids: set[str]) -> tuple[dict[str, str], list[dict]]:
    """A reviewers' CSV -> ({image_id: identity} of accepted rows, rejected rows with reasons)."""
    import io

    import pandas as pd

    try:
        df = pd.read_csv(io.BytesIO(rio.read_bytes(path)), dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ConfigError(f"reviewed CSV not found: {path}") from None
    missing = {"image_id", "identity"} - set(df.columns)
    if missing:
        raise ConfigError(f"reviewed CSV {path} lacks column(s) {sorted(missing)}")
    accepted: dict[str, str] = {}
    errors: list[dict] = []
    for row in df.to_dict("records"):
        image_id, identity = row["image_id"].strip(), row["identity"].strip()
        accept = str(row.get("accept", "yes")).strip().lower()
        reason = None
        if accept not in YES | NO:
            reason = f"accept must be yes or no, got {accept!r}"
        elif accept in NO:
            continue
        elif image_id not in known_ids:
            reason = "not in the night's results"
        elif not identity:
            reason = "accepted without an identity"
        elif image_id in accepted:
            reason = "listed twice in the reviewed CSV"
        if reason:
            errors.append({"image_id": image_id, "path": path, "stage": "merge", "reason": reason})
        else:
            accepted[image_id] = identity
    return accepted, errors


def merge_results(
    gallery: str,
    results_dirs: list[str] | str,
    cfg: NightlyConfig | None = None,
    *,
    reviewed: str | None = None,
) -> dict[str, Any]:
    """Merge the accepted results of one or more nights into a new version of ``gallery``.

    Returns a report (``added``, ``skipped_in_gallery``, ``errors``, ``version``,
    ``new_version``).
    """
    from reid_ray.embed import read_embeddings
    from reid_ray.gallery.build import calibrator

    cfg = cfg or NightlyConfig()
    dirs = [results_dirs] if isinstance(results_dirs, str) else list(results_dirs)
    if not dirs:
        raise ConfigError("merge needs at least one identify output (--results)")
    if reviewed and len(dirs) != 1:
        raise ConfigError("a reviewed CSV belongs to one night: give exactly one --results")
    t0 = time.perf_counter()
    current = open_version(gallery)
    in_gallery = set(read_table(current, ["image_id"]).column("image_id").to_pylist())
    new_parts, merged, errors = [], [], []
    skipped = 0
    for results_dir in dirs:
        table, record = _results(results_dir, current.key)
        ids = table.column("image_id").to_pylist()
        if reviewed:
            accepted, bad = read_reviewed(reviewed, set(ids))
            errors.extend(bad)
        else:
            accepted = {i: p for i, p in zip(ids, table["identity"].to_pylist(), strict=True) if p}
        todo = [i for i in sorted(accepted) if i not in in_gallery]
        skipped += len(accepted) - len(todo)
        if not todo:
            continue
        emb = read_embeddings(record["embed"], ids=todo)
        if emb.key != current.key:
            raise ConfigError(f"{record['embed']} holds key {emb.key}, the gallery {current.key}")
        lost = set(todo) - set(emb.ids.tolist())
        if lost:
            raise OutputError(
                f"{results_dir}: {len(lost)} accepted image(s) have no embedding "
                f"in {record['embed']}: {sorted(lost)[:5]}"
            )
        paths = by_image_id(table, "path")
        boxes = by_image_id(table, "bbox")
        got = emb.ids.tolist()
        night = record.get("night", "")
        new_parts.append(
            gallery_table(
                got,
                [accepted[i] for i in got],
                emb.matrix,
                emb.key,
                [paths.get(i) for i in got],
                "",
                f"{night}",
                bboxes=[boxes.get(i) for i in got],
            )
        )
        in_gallery.update(got)
        merged.append(
            {
                "results": results_dir,
                "night": night,
                "reviewed": reviewed,
                "added": len(got),
                "identified": record.get("created"),
            }
        )
    report: dict[str, Any] = {
        "gallery": gallery,
        "parent": current.name,
        "added": sum(t.num_rows for t in new_parts),
        "skipped_in_gallery": skipped,
        "errors": errors,
        "new_version": bool(new_parts),
    }
    if not new_parts:
        logger.info("merge: nothing new for gallery %s (%s stays current)", gallery, current.name)
        report["version"] = current.name
    else:
        version = write_version(
            gallery,
            pa.concat_tables(new_parts),
            parent=current,
            model=current.info["model"],
            calibrate=calibrator(cfg, current.info["model"]["ref"]),
            operation="merge",
            merged=merged,
        )
        report["version"] = version.name
        report["counts"] = version.info["counts"]
        report["threshold"] = version.info["threshold"]
    report["seconds"] = time.perf_counter() - t0
    return report
