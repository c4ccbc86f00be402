"""The review of one night, without a server: its items, the reviewers' decisions, the files.

One :class:`ReviewState` per results folder is the only writer. Every decision is kept in
``DIR/review.partial.json`` (so a later sitting resumes where the last one stopped) and
``DIR/reviewed.csv`` is rewritten from it (the sheet of ``sheet.py``, valid for
``gallery merge --reviewed`` at every moment: rows not reviewed yet are never merged); both
atomically, under one lock, so two browser tabs cannot lose each other's decisions. After
each write the CSV is read back and validated by the code ``gallery merge`` runs.

Decisions: ``top`` (the first candidate), ``candidate`` N (1-9), ``new`` (a new individual,
with a name; :func:`next_name` suggests one), ``reject`` (never merge this image), ``skip``
(come back later: not reviewed) and ``undo`` (forget the decision).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from reid_ray import io as rio
from reid_ray import parts as rparts
from reid_ray.errors import ConfigError, OutputError
from reid_ray.review.sheet import (
    ERROR,
    KNOWN,
    NEW,
    REVIEWED_NAME,
    ReviewCheck,
    sheet_bytes,
    sheet_rows,
)

logger = logging.getLogger(__name__)

PARTIAL_NAME = "review.partial.json"
PARTIAL_FORMAT = "reid-ray-review/1"
ACTIONS = ("top", "candidate", "new", "reject", "skip", "undo")
MAX_CHOICES = 9
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def next_name(taken: set[str], like: str | None = None) -> str | None:
    """The next free name in a numbered series: ``like``'s series when it has one (e.g. the
    top candidate's ``sp1-ind004`` -> ``sp1-ind<max+1>``), else the most common series in
    ``taken``; None when no name is numbered."""
    series: dict[str, list[int]] = {}
    widths: dict[str, int] = {}
    for name in taken:
        m = _NUMBERED.match(name)
        if m:
            series.setdefault(m.group(1), []).append(int(m.group(2)))
            widths[m.group(1)] = max(widths.get(m.group(1), 0), len(m.group(2)))
    m = _NUMBERED.match(like or "")
    if m and m.group(1) in series:
        prefix = m.group(1)
    elif series:
        prefix = max(series, key=lambda p: (len(series[p]), p))
    else:
        return None
    n = max(series[prefix]) + 1
    while f"{prefix}{n:0{widths[prefix]}d}" in taken:
        n += 1
    return f"{prefix}{n:0{widths[prefix]}d}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ReviewState:
    """A night's review: ``items`` (identified images, with up to 9 candidates each),
    ``failed`` (images not identified, with reasons), the ``decisions`` and the files."""

    def __init__(
        self, results_dir: str, reviewed_path: str | None = None, *, read_only: bool = False
    ):
        from reid_ray.data.manifest import ERRORS_SCHEMA
        from reid_ray.gallery.identification import RESULTS_SCHEMA
        from reid_ray.gallery.store import open_version, read_table

        record = rparts.read_run_record(results_dir)
        if record is None or record.get("command") != "identify":
            raise OutputError(
                f"{results_dir} is not a complete identify output (no manifest.json): run "
                "`reid-ray identify --gallery G --manifest NIGHT --out DIR` first"
            )
        self.results_dir = results_dir
        self.record = record
        self.reviewed_path = reviewed_path or rio.join(results_dir, REVIEWED_NAME)
        self.partial_path = rio.join(results_dir, PARTIAL_NAME)
        results = rparts.read_parts(rio.join(results_dir, "results"), RESULTS_SCHEMA)
        errors = rparts.read_parts(rio.join(results_dir, "errors"), ERRORS_SCHEMA)
        self.version = open_version(record["gallery"], record["gallery_version"])
        gallery = read_table(self.version, ["image_id", "identity", "path", "bbox"]).to_pylist()
        self.gallery_images = {g["image_id"]: g for g in gallery}
        self.gallery_identities = {g["identity"] for g in gallery}
        paths = {g["image_id"]: g["path"] for g in gallery}
        self.rows = sheet_rows(results, errors, paths)
        self.results = {r["image_id"]: r for r in results.to_pylist()}
        self.items = [r for r in self.rows if r["proposed_decision"] != ERROR]
        self.failed = [
            {k: r[k] for k in ("image_id", "path", "reason")}
            for r in self.rows
            if r["proposed_decision"] == ERROR
        ]
        self.reranked = any(r.get("reranked") for r in self.results.values())
        self._lock = threading.Lock()
        self.decisions: dict[str, dict[str, Any]] = {}
        self.dropped: list[str] = []
        self._load_partial()
        # a resumed sitting rewrites the CSV from its decisions (the page is the one writer);
        # read_only (``review --check``) validates the file as it is
        self.check = self._write() if self.decisions and not read_only else self._validate_only()

    # -- files ---------------------------------------------------------------------------

    def _load_partial(self) -> None:
        if not rio.exists(self.partial_path):
            if rio.exists(self.reviewed_path):
                logger.warning(
                    "%s exists without %s: the page starts a new review and will rewrite it",
                    self.reviewed_path,
                    self.partial_path,
                )
            return
        saved = rio.read_json(self.partial_path)
        if saved.get("format") != PARTIAL_FORMAT:
            raise ConfigError(f"{self.partial_path} is not a review file ({PARTIAL_FORMAT})")
        for image_id, decision in saved.get("decisions", {}).items():
            try:
                _, chosen, _ = self._resolve(image_id, decision)
                if decision.get("action") in ("top", "candidate") and chosen != decision.get(
                    "identity", chosen
                ):
                    raise ConfigError(
                        f"the candidates changed since (was {decision['identity']!r}, now "
                        f"{chosen!r}): identify was rerun; review it again"
                    )
            except ConfigError as exc:  # results rewritten since: say so, never drop silently
                self.dropped.append(f"{image_id}: {exc}")
                logger.warning("%s: decision for %s not loaded: %s", self.partial_path,
                               image_id, exc)  # fmt: skip
                continue
            self.decisions[image_id] = decision

    def reviewed_rows(self) -> list[dict[str, str]]:
        """The sheet with each decision applied (decision, identity, accept)."""
        rows = []
        for row in self.rows:
            d = self.decisions.get(row["image_id"])
            row = dict(row)
            if d is not None and d["action"] != "skip":
                decision, identity, accept = self._resolve(row["image_id"], d)
                row.update(decision=decision, identity=identity, accept=accept)
            rows.append(row)
        return rows

    def _write(self) -> ReviewCheck:
        rio.write_json_atomic(
            self.partial_path,
            {
                "format": PARTIAL_FORMAT,
                "results": self.results_dir,
                "night": self.record.get("night"),
                "gallery_version": self.record.get("gallery_version"),
                "updated": _now(),
                "decisions": self.decisions,
            },
        )
        rio.write_bytes_atomic(self.reviewed_path, sheet_bytes(self.reviewed_rows()))
        return self._validate_only() if rio.exists(self.reviewed_path) else ReviewCheck()

    def _validate_only(self) -> ReviewCheck:
        """The CSV on disk, checked by merge's own reader and validation (the sheet before
        any decision when there is no file yet)."""
        from reid_ray.gallery.merge import review_check
        from reid_ray.review.sheet import check_reviewed

        if rio.exists(self.reviewed_path):
            return review_check(self.reviewed_path, set(self.results), self.gallery_identities)
        return check_reviewed(self.reviewed_rows(), set(self.results), self.gallery_identities)

    # -- decisions -----------------------------------------------------------------------

    def _resolve(self, image_id: str, d: dict[str, Any]) -> tuple[str, str, str]:
        """(decision, identity, accept) of a stored decision; ConfigError when it does not
        fit the night's results."""
        r = self.results.get(image_id)
        if r is None:
            raise ConfigError(f"{image_id!r} is not one of the night's identified images")
        action = d.get("action")
        names = r["cand_identities"] or []
        if action == "top":
            if not names:
                raise ConfigError(f"{image_id} has no candidate to accept")
            return KNOWN, names[0], "yes"
        if action == "candidate":
            n = d.get("candidate")
            if not isinstance(n, int) or not 1 <= n <= min(len(names), MAX_CHOICES):
                raise ConfigError(f"{image_id} has no candidate {n!r} (1-{len(names)})")
            return KNOWN, names[n - 1], "yes"
        if action == "new":
            name = str(d.get("identity") or "").strip()
            if not name:
                raise ConfigError("a new individual needs a name")
            if name in self.gallery_identities:
                raise ConfigError(
                    f"{name!r} is already an individual of the gallery: choose its candidate, "
                    "or give the new individual another name"
                )
            return NEW, name, "yes"
        if action == "reject":
            return r["decision"], r["identity"] or "", "no"
        if action == "skip":
            return r["decision"], r["identity"] or "", ""
        raise ConfigError(f"unknown decision {action!r}: one of {', '.join(ACTIONS)}")

    def decide(
        self,
        image_id: str,
        action: str,
        candidate: int | None = None,
        identity: str | None = None,
        reviewer: str | None = None,
    ) -> dict[str, Any]:
        """Record one decision (validated), write both files, return :meth:`progress`."""
        with self._lock:
            if action == "undo":
                if image_id not in self.results:
                    raise ConfigError(f"{image_id!r} is not one of the night's identified images")
                self.decisions.pop(image_id, None)
            else:
                d: dict[str, Any] = {"action": action, "at": _now()}
                if candidate is not None:
                    d["candidate"] = candidate
                if identity is not None:
                    d["identity"] = str(identity).strip()
                if reviewer:
                    d["reviewer"] = reviewer
                _, chosen, _ = self._resolve(image_id, d)
                if action in ("top", "candidate"):
                    d["identity"] = chosen  # checked again when a later sitting loads it
                self.decisions[image_id] = d
            self.check = self._write()
            return self.progress()

    def suggest(self, image_id: str) -> dict[str, str | None]:
        """A name for ``image_id`` as a new individual: the name already given to an image
        of its provisional group tonight, else the next name of its top candidate's series."""
        r = self.results.get(image_id)
        if r is None:
            raise ConfigError(f"{image_id!r} is not one of the night's identified images")
        with self._lock:
            named = {i: d["identity"] for i, d in self.decisions.items() if d["action"] == "new"}
        group = r["identity"] if r["decision"] == NEW else None
        for other, name in sorted(named.items()):
            o = self.results[other]
            if group and other != image_id and o["decision"] == NEW and o["identity"] == group:
                return {"name": name, "why": f"the name given to {other}, same provisional group"}
        taken = self.gallery_identities | set(named.values())
        top = (r["cand_identities"] or [None])[0]
        name = next_name(taken, top)
        if name is None:
            return {"name": group or f"new-{self.record.get('night')}", "why": "provisional id"}
        return {"name": name, "why": "next free name of the series of the top candidate"}

    def progress(self) -> dict[str, Any]:
        kinds = Counter(d["action"] for d in self.decisions.values())
        skipped = kinds.pop("skip", 0)
        return {
            "total": len(self.items),
            "reviewed": sum(kinds.values()),
            "skipped": skipped,
            "by_action": dict(kinds),
            "decisions": self.decisions,
            "check": {
                "ok": self.check.ok,
                "summary": self.check.summary(),
                "counts": self.check.counts,
                "errors": self.check.errors[:50],
            },
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows."""
        items = []
        for row in self.items:
            r = self.results[row["image_id"]]
            n = min(len(r["cand_identities"] or []), MAX_CHOICES)

            def at(column: str, j: int, values=r) -> float | None:
                v = values.get(column) or []
                return v[j] if j < len(v) else None

            items.append(
                {
                    "image_id": row["image_id"],
                    "path": row["path"],
                    "proposed_decision": row["proposed_decision"],
                    "proposed_identity": row["proposed_identity"],
                    "confidence": row["confidence"],
                    "candidates": [
                        {
                            "n": j + 1,
                            "identity": r["cand_identities"][j],
                            "image_id": at("cand_images", j),
                            "probability": at("cand_probabilities", j),
                            "cosine": at("cand_scores", j),
                            "local": at("cand_local_scores", j),
                        }
                        for j in range(n)
                    ],
                }
            )
        return {
            "results": self.results_dir,
            "night": self.record.get("night"),
            "gallery": self.record.get("gallery"),
            "gallery_version": self.record.get("gallery_version"),
            "reranked": self.reranked,
            "reviewed_csv": self.reviewed_path,
            "merge_command": merge_command(
                self.record.get("gallery"), self.results_dir, self.reviewed_path
            ),
            "items": items,
            "failed": self.failed,
            "dropped": self.dropped,
            **self.progress(),
        }


def merge_command(gallery: str | None, results_dir: str, reviewed: str) -> str:
    return (
        f"reid-ray gallery merge --gallery {gallery} --results {results_dir} --reviewed {reviewed}"
    )


__all__ = ["ACTIONS", "PARTIAL_NAME", "ReviewState", "merge_command", "next_name"]
