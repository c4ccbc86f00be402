"""``gallery merge``: accepted nightly results -> a new gallery version.

Accepted rows are every result of the night (its decision and identity, provisional ids for
new individuals), or, with a reviewed CSV (``OUT/review.csv`` filled in by reviewers, or
``OUT/reviewed.csv`` from the review page), the rows whose ``accept`` is yes, with the
``identity`` the reviewer left or corrected; unreviewed rows (``accept`` empty) are not
merged. The CSV's contract and its one validation are in ``reid_ray/review/sheet.py``.

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


def read_reviewed(
    path: str, known_ids: set[str], gallery_identities: set[str] | None = None
) -> tuple[dict[str, str], list[dict]]:
    """A reviewers' CSV -> ({image_id: identity} of accepted rows, refused rows with reasons).

    The validation is ``reid_ray.review.sheet.check_reviewed``, the same the review page
    reports; only rows with ``accept`` yes are accepted (empty: not reviewed yet).
    """
    check = review_check(path, known_ids, gallery_identities)
    return check.accepted, check.errors


def review_check(path: str, known_ids: set[str], gallery_identities: set[str] | None = None):
    """The full :class:`~reid_ray.review.sheet.ReviewCheck` of a reviewed CSV."""
    from reid_ray.review.sheet import check_reviewed, read_sheet

    return check_reviewed(read_sheet(path), known_ids, gallery_identities, source=path)


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
    review_counts: dict[str, int] | None = None
    for results_dir in dirs:
        table, record = _results(results_dir, current.key)
        ids = table.column("image_id").to_pylist()
        if reviewed:
            gallery_identities = set(read_table(current, ["identity"])["identity"].to_pylist())
            check = review_check(reviewed, set(ids), gallery_identities)
            accepted, review_counts = check.accepted, check.counts
            errors.extend(check.errors)
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
    if review_counts is not None:  # accepted / rejected / not reviewed / failed images
        report["review"] = review_counts
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
