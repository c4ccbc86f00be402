"""The review sheet: the one CSV contract between ``identify``, reviewers and ``gallery merge``.

``identify`` writes ``OUT/review.csv`` (:func:`write_review_sheet`); reviewers fill it in by
hand or on the review page (``reid-ray review``, which writes ``OUT/reviewed.csv``, the same
columns); ``gallery merge --reviewed`` reads it through :func:`check_reviewed`, the one
validation the page and the merge both report. Columns, one row per image of the night::

    image_id, path, bbox          the night's image (bbox ``x y w h``; empty: whole image)
    proposed_decision             identify's decision: known | new | error (not identified)
    proposed_identity             identify's individual (a gallery identity, or the
                                  provisional ``new-<night>-<nnnn>`` of its group)
    confidence                    P(the proposed decision is right): the top candidate's
                                  calibrated probability for ``known``, one minus it for ``new``
    reason                        why an ``error`` row was not identified
    candidate_N, confidence_N     the N-th candidate individual and P(same individual)
    candidate_N_image             its gallery image id (the best image of that individual)
    candidate_N_path              that gallery image's file
    decision, identity            the reviewer's answer (pre-filled with the proposal)
    accept                        yes: merge ``identity`` into the gallery; no: do not;
                                  empty: not reviewed yet (never merged)

An untouched row is therefore never merged; ``error`` rows (images that failed, with their
reason) are listed so a reviewer sees them, and cannot be accepted.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from reid_ray import io as rio
from reid_ray.errors import ConfigError

KNOWN, NEW, ERROR = "known", "new", "error"
CANDIDATES = 3
YES = {"yes", "y", "true", "1", "accept", "ok"}
NO = {"no", "n", "false", "0", "reject"}
SHEET_NAME = "review.csv"
REVIEWED_NAME = "reviewed.csv"


def sheet_columns(candidates: int = CANDIDATES) -> list[str]:
    cols = ["image_id", "path", "bbox", "proposed_decision", "proposed_identity", "confidence"]
    cols.append("reason")
    for n in range(1, candidates + 1):
        cols += [f"candidate_{n}", f"confidence_{n}", f"candidate_{n}_image", f"candidate_{n}_path"]
    return [*cols, "decision", "identity", "accept"]


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{float(value):.4f}"


def _bbox_text(bbox) -> str:
    return "" if bbox is None else " ".join(f"{float(v):g}" for v in bbox)


def parse_bbox(text: str | None) -> list[float] | None:
    """``"x y w h"`` (the sheet's spelling) -> four floats; empty -> None (whole image)."""
    parts = (text or "").split()
    return [float(v) for v in parts] if len(parts) == 4 else None


def proposal_confidence(decision: str, top_probability: float | None) -> float | None:
    """P(the decision is right) from the top candidate's P(same individual)."""
    if top_probability is None or not math.isfinite(top_probability):
        return None
    return top_probability if decision == KNOWN else 1.0 - top_probability


def sheet_rows(
    results: pa.Table,
    errors: pa.Table | None = None,
    gallery_paths: dict[str, str] | None = None,
    candidates: int = CANDIDATES,
) -> list[dict[str, str]]:
    """One sheet row per identified image (RESULTS_SCHEMA rows) and per failed image
    (image_id, path, stage, reason), in image id order; ``gallery_paths`` gives the
    candidates' files."""
    gallery_paths = gallery_paths or {}
    rows = []
    for r in results.to_pylist():
        probs = r["cand_probabilities"] or []
        row = {
            "image_id": r["image_id"],
            "path": r["path"] or "",
            "bbox": _bbox_text(r.get("bbox")),
            "proposed_decision": r["decision"],
            "proposed_identity": r["identity"] or "",
            "confidence": _number(proposal_confidence(r["decision"], probs[0] if probs else None)),
            "reason": "",
            "decision": r["decision"],
            "identity": r["identity"] or "",
            "accept": "",
        }
        names, images = r["cand_identities"] or [], r["cand_images"] or []
        for j in range(candidates):
            have = j < len(names)
            image = images[j] if have and j < len(images) else ""
            row[f"candidate_{j + 1}"] = names[j] if have else ""
            row[f"confidence_{j + 1}"] = _number(probs[j]) if have and j < len(probs) else ""
            row[f"candidate_{j + 1}_image"] = image
            row[f"candidate_{j + 1}_path"] = gallery_paths.get(image) or ""
        rows.append(row)
    identified = {r["image_id"] for r in rows}
    seen: dict[str, dict] = {}
    for e in errors.to_pylist() if errors is not None else []:
        if e["image_id"] in identified:
            continue  # the image was identified despite this error
        if e["image_id"] in gallery_paths and e["stage"] != "identify":
            continue  # a gallery candidate that failed in re-ranking, not a night image
        row = seen.get(e["image_id"])
        if row is not None:  # one row per image, its reasons joined
            row["reason"] = f"{row['reason']}; {e['stage']}: {e['reason']}"
            continue
        row = dict.fromkeys(sheet_columns(candidates), "")
        row.update(
            image_id=e["image_id"],
            path=e["path"] or "",
            proposed_decision=ERROR,
            decision=ERROR,
            reason=f"{e['stage']}: {e['reason']}",
        )
        seen[e["image_id"]] = row
    return sorted([*rows, *seen.values()], key=lambda r: (r["proposed_decision"] == ERROR,
                                                         r["image_id"]))  # fmt: skip


def sheet_bytes(rows: list[dict[str, str]], candidates: int = CANDIDATES) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=sheet_columns(candidates), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def write_review_sheet(out: str, results: pa.Table, errors: pa.Table | None, version) -> str:
    """``identify``'s one call: write ``OUT/review.csv`` (atomically) for the night's
    ``results`` and ``errors`` against gallery ``version``; returns its path."""
    from reid_ray.gallery.store import by_image_id, read_table

    paths = by_image_id(read_table(version, ["image_id", "path"]), "path")
    path = rio.join(out, SHEET_NAME)
    rio.write_bytes_atomic(path, sheet_bytes(sheet_rows(results, errors, paths)))
    return path


def next_steps(out: str, gallery: str) -> list[tuple[str, str]]:
    """Rows for ``identify``'s terminal summary: the sheet and the commands that follow."""
    sheet = rio.join(out, SHEET_NAME)
    reviewed = rio.join(out, REVIEWED_NAME)
    return [
        ("review sheet", f"{sheet} (nothing is accepted until reviewed)"),
        ("review", f"reid-ray review --results {out}"),
        (
            "merge",
            f"reid-ray gallery merge --gallery {gallery} --results {out} --reviewed {reviewed}",
        ),
    ]


def read_sheet(path: str) -> list[dict[str, str]]:
    """A sheet's rows as strings (stripped); a missing file or column is a ConfigError."""
    try:
        text = rio.read_bytes(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"reviewed CSV not found: {path}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = {"image_id", "identity", "accept"} - set(reader.fieldnames or [])
    if missing:
        raise ConfigError(
            f"reviewed CSV {path} lacks column(s) {sorted(missing)}: start from the review.csv "
            "that identify wrote, or use `reid-ray review`"
        )
    return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


@dataclass
class ReviewCheck:
    """What a reviewed sheet gives ``gallery merge``: ``accepted`` {image_id: identity},
    ``errors`` (rows refused, with reasons) and ``counts``."""

    accepted: dict[str, str] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        c = self.counts
        text = (
            f"{c['accepted']} accepted ({c['accepted_new']} as new individuals), "
            f"{c['rejected']} rejected, {c['unreviewed']} not reviewed, "
            f"{c['failed_images']} failed images"
        )
        return text + (f"; {len(self.errors)} invalid row(s)" if self.errors else "; valid")


def check_reviewed(
    rows: list[dict[str, str]],
    result_ids: set[str],
    gallery_identities: set[str] | None = None,
    source: str = "",
) -> ReviewCheck:
    """Validate reviewed rows once, for the merge and the page alike.

    A row is merged only when ``accept`` is yes; empty is "not reviewed" (not merged, not an
    error). Refused, with a reason: an ``accept`` that is not yes/no/empty; an accepted row
    that is a failed image, is not in the night's results, has no identity, repeats an
    image, or says ``new`` with the name of an individual already in the gallery.
    """
    check = ReviewCheck()
    counts = dict.fromkeys(
        ["rows", "accepted", "accepted_new", "rejected", "unreviewed", "failed_images"], 0
    )
    for row in rows:
        counts["rows"] += 1
        image_id, identity = row.get("image_id", ""), row.get("identity", "")
        accept = row.get("accept", "").lower()
        decision = (row.get("decision") or "").lower()
        failed = row.get("proposed_decision") == ERROR or decision == ERROR
        counts["failed_images"] += failed
        reason = None
        if accept and accept not in YES | NO:
            reason = f"accept must be yes or no (empty: not reviewed yet), got {accept!r}"
        elif not accept:
            counts["unreviewed"] += not failed
            continue
        elif accept in NO:
            counts["rejected"] += 1
            continue
        elif failed:
            reason = f"a failed image cannot be merged ({row.get('reason') or 'no embedding'})"
        elif image_id not in result_ids:
            reason = "not in the night's results"
        elif not identity:
            reason = "accepted without an identity"
        elif image_id in check.accepted:
            reason = "listed twice in the reviewed CSV"
        elif decision == NEW and gallery_identities and identity in gallery_identities:
            reason = (
                f"decision is new but {identity!r} is already in the gallery: "
                "set decision to known, or give the new individual another name"
            )
        if reason:
            check.errors.append(
                {"image_id": image_id, "path": source, "stage": "merge", "reason": reason}
            )
        else:
            check.accepted[image_id] = identity
            counts["accepted"] += 1
            counts["accepted_new"] += decision == NEW
    check.counts = {**counts, "invalid": len(check.errors)}
    return check


__all__ = [
    "CANDIDATES",
    "REVIEWED_NAME",
    "SHEET_NAME",
    "ReviewCheck",
    "check_reviewed",
    "next_steps",
    "parse_bbox",
    "proposal_confidence",
    "read_sheet",
    "sheet_bytes",
    "sheet_columns",
    "sheet_rows",
    "write_review_sheet",
]
