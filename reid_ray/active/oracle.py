"""Who answers "same animal or not?": a simulated oracle, or people via two files.

The simulated oracle is the only code that reads ground-truth identities during an AL run
(benchmarks). The human round trip:

- ``write_pairs_file``: ``pairs.csv`` with ``pair_id,image_id_a,path_a,image_id_b,path_b,
  thumbnail,bbox_a,bbox_b`` and one side-by-side JPEG per pair under ``thumbs/`` (both
  animals cropped to their boxes, ``reid_ray.active.views``);
- the annotation page (``reid_ray.active.annotate``, the one writer) saves each answer to
  ``answers.partial.csv`` and, once every pair is answered, ``answers.csv``; a person may
  also write ``answers.csv`` by hand: ``pair_id,answer`` with ``same``, ``different``,
  ``unsure`` (looked, cannot tell: spends budget, never asked again) or ``skip`` (not now:
  spends nothing, may be asked again in a later round);
- ``load_answers`` reads both files (the page's answers win) and ``read_answers`` validates
  one, reporting every problem (unknown pair ids, duplicates, conflicting duplicates, bad
  values, malformed rows, unanswered pairs, contradictions such as A=B, B=C, A!=C); no row
  is dropped without being listed in the report. Both normalise answers with
  ``normalise_answer``, the one spelling rule of the page and the reader.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field

import numpy as np

from reid_ray import io as rio
from reid_ray.active.views import CROP_SIDE, side_by_side
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

PAIRS_COLUMNS = ["pair_id", "image_id_a", "path_a", "image_id_b", "path_b", "thumbnail"]
BOX_COLUMNS = ["bbox_a", "bbox_b"]  # written since boxes are shown; older files lack them
ANSWER_COLUMNS = ["pair_id", "answer"]
ANSWERS = ("same", "different", "unsure", "skip")
SPENDING = ("same", "different", "unsure")  # the answers that spend budget
ALIASES = {"s": "same", "d": "different", "u": "unsure", "k": "skip"}
ANSWERS_FILE = "answers.csv"  # complete answers (the page's once done, or hand-written)
PARTIAL_FILE = "answers.partial.csv"  # the page's answers so far, sitting by sitting
THUMB_SIDE = CROP_SIDE


def normalise_answer(raw) -> str | None:
    """``same``/``different``/``unsure``/``skip`` from any case, spaces or the one-letter
    keys (s, d, u, k); None for anything else. The page and the reader both use this."""
    text = str(raw if raw is not None else "").strip().lower()
    text = ALIASES.get(text, text)
    return text if text in ANSWERS else None


class SimulatedOracle:
    """Answers from ground truth: ``same`` / ``different``; ``unsure`` when either image
    has no identity. Counts what it was asked."""

    def __init__(self, identities):
        self._identities = np.asarray(identities, dtype=object)
        self.asked = 0

    def __call__(self, pairs) -> list[str]:
        out = []
        for a, b in pairs:
            ia, ib = self._identities[a], self._identities[b]
            self.asked += 1
            if ia is None or ib is None:
                out.append("unsure")
            else:
                out.append("same" if ia == ib else "different")
        return out


def pair_id(round_index: int, k: int) -> str:
    return f"r{round_index}-{k:05d}"


def format_bbox(bbox) -> str:
    """``x,y,w,h`` as the manifest writes it (empty: the whole image)."""
    return "" if bbox is None else "[" + ", ".join(f"{float(v):g}" for v in bbox) + "]"


def pair_boxes(row: dict) -> tuple[list[float] | None, list[float] | None]:
    """The two boxes of a ``pairs.csv`` row (None: whole image, or an older file)."""
    from reid_ray.data.manifest import parse_bbox

    return parse_bbox(row.get("bbox_a") or None), parse_bbox(row.get("bbox_b") or None)


def write_pairs_file(
    folder: str,
    pairs,
    image_ids,
    paths,
    *,
    round_index: int = 0,
    thumbnails: bool = True,
    boxes=None,
) -> dict:
    """Write ``folder/pairs.csv`` (and ``folder/thumbs/<pair_id>.jpg``) for ``pairs`` of
    row indices into ``image_ids``/``paths`` (and ``boxes``, ``x,y,w,h`` or None). An image
    that cannot be read gets no thumbnail (its row says why in the log and ``thumbnail`` is
    empty); returns counts."""
    boxes = boxes if boxes is not None else [None] * len(image_ids)
    rows, n_thumb_errors = [], 0
    for k, (a, b) in enumerate(pairs):
        pid = pair_id(round_index, k)
        thumb = ""
        if thumbnails:
            rel = f"thumbs/{pid}.jpg"
            try:
                jpg = side_by_side(paths[a], paths[b], THUMB_SIDE, boxes[a], boxes[b])
                rio.write_bytes_atomic(rio.join(folder, rel), jpg)
                thumb = rel
            except Exception as exc:  # noqa: BLE001 - a bad image must not stop the file
                n_thumb_errors += 1
                logger.warning("no thumbnail for %s: %s", pid, exc)
        rows.append([pid, image_ids[a], paths[a], image_ids[b], paths[b], thumb,
                     format_bbox(boxes[a]), format_bbox(boxes[b])])  # fmt: skip
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(PAIRS_COLUMNS + BOX_COLUMNS)
    writer.writerows(rows)
    rio.write_bytes_atomic(rio.join(folder, "pairs.csv"), text.getvalue().encode())
    return {"pairs": len(rows), "thumbnail_errors": n_thumb_errors}


def read_pairs_file(path: str) -> list[dict]:
    text = rio.read_bytes(path).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in PAIRS_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}")
    return list(reader)


@dataclass
class AnswersReport:
    """Validated answers: per usable pair its answer, and every problem found."""

    answers: dict[str, str] = field(default_factory=dict)  # pair_id -> one of ANSWERS
    unknown_ids: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    conflicting: list[dict] = field(default_factory=list)
    bad_values: list[dict] = field(default_factory=list)
    malformed: list[dict] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    contradictions: list[dict] = field(default_factory=list)
    n_rows: int = 0

    def counts(self) -> dict[str, int]:
        used = list(self.answers.values())
        return {
            "rows": self.n_rows,
            "same": used.count("same"),
            "different": used.count("different"),
            "unsure": used.count("unsure"),
            "skip": used.count("skip"),
            "unknown_pair_ids": len(self.unknown_ids),
            "duplicates": len(self.duplicates),
            "conflicting_duplicates": len(self.conflicting),
            "bad_values": len(self.bad_values),
            "malformed_rows": len(self.malformed),
            "unanswered": len(self.unanswered),
            "contradictions": len(self.contradictions),
        }

    @property
    def ok(self) -> bool:
        c = self.counts()
        return not any(c[k] for k in c if k not in ("rows", *ANSWERS))

    def lines(self) -> list[str]:
        """A human-readable report, one problem a line."""
        out = [", ".join(f"{k} {v}" for k, v in self.counts().items())]
        for r in self.unknown_ids:
            out.append(f"line {r['line']}: unknown pair id {r['pair_id']!r}")
        for r in self.duplicates:
            out.append(f"line {r['line']}: {r['pair_id']} answered again (same answer; kept once)")
        for r in self.conflicting:
            out.append(f"{r['pair_id']}: conflicting answers {r['answers']} on lines "
                       f"{r['lines']}: not used")  # fmt: skip
        for r in self.bad_values:
            out.append(f"line {r['line']}: {r['pair_id']}: bad answer {r['answer']!r} "
                       f"(use {', '.join(ANSWERS)})")  # fmt: skip
        for r in self.malformed:
            out.append(f"line {r['line']}: malformed row {r['row']!r}: {r['reason']}")
        if self.unanswered:
            out.append(f"unanswered: {', '.join(self.unanswered[:20])}"
                       + (" ..." if len(self.unanswered) > 20 else ""))  # fmt: skip
        for r in self.contradictions:
            out.append(f"contradiction: {r['cannot_pair']} says different but "
                       f"{' + '.join(r['must_pairs'])} say same")  # fmt: skip
        return out


def read_answers(path: str, pairs: list[dict]) -> AnswersReport:
    """Read and validate ``pair_id,answer`` against the ``pairs`` rows (of
    ``read_pairs_file``). Conflicting duplicates are not used; contradicting answers are
    kept and reported (the refinement reports them again and does not enforce the
    cannot-link)."""
    from reid_ray.active.constraints import find_contradictions

    known = {p["pair_id"]: p for p in pairs}
    report = AnswersReport()
    seen: dict[str, list[tuple[int, str]]] = {}
    text = rio.read_bytes(path).decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[:2]] != ANSWER_COLUMNS:
        raise ConfigError(f"{path}: the first line must be the header 'pair_id,answer'")
    for line, row in enumerate(reader, start=2):
        report.n_rows += 1
        if not row or all(not c.strip() for c in row):
            report.malformed.append({"line": line, "row": ",".join(row), "reason": "empty"})
            continue
        if len(row) != 2 or not row[0].strip():
            reason = "expected 2 fields" if len(row) != 2 else "no pair id"
            report.malformed.append({"line": line, "row": ",".join(row), "reason": reason})
            continue
        pid, answer = row[0].strip(), normalise_answer(row[1])
        if pid not in known:
            report.unknown_ids.append({"line": line, "pair_id": pid})
            continue
        if answer is None:
            report.bad_values.append({"line": line, "pair_id": pid, "answer": row[1]})
            continue
        seen.setdefault(pid, []).append((line, answer))
    for pid, entries in seen.items():
        values = sorted({a for _, a in entries})
        if len(values) > 1:
            report.conflicting.append(
                {"pair_id": pid, "answers": values, "lines": [n for n, _ in entries]}
            )
            continue
        for n, _ in entries[1:]:
            report.duplicates.append({"line": n, "pair_id": pid})
        report.answers[pid] = values[0]
    answered = set(report.answers) | {c["pair_id"] for c in report.conflicting}
    report.unanswered = [p for p in known if p not in answered]
    report.contradictions = answer_contradictions(known, report.answers, find_contradictions)
    return report


def load_answers(folder: str, pairs: list[dict]) -> AnswersReport:
    """The answers of a pairs folder: a hand-written ``answers.csv`` and the page's
    ``answers.partial.csv`` (its answers win: a person changed their mind on the page).
    Problems of both files are reported; an answer settled in the page's file is no longer
    counted as a conflict of the hand-written one."""
    from reid_ray.active.constraints import find_contradictions

    known = {p["pair_id"]: p for p in pairs}
    merged = AnswersReport()
    for name in (ANSWERS_FILE, PARTIAL_FILE):
        path = rio.join(folder, name)
        if not rio.exists(path):
            continue
        one = read_answers(path, pairs)
        merged.n_rows += one.n_rows
        merged.conflicting = [c for c in merged.conflicting if c["pair_id"] not in one.answers]
        merged.answers.update(one.answers)
        for key in ("unknown_ids", "duplicates", "conflicting", "bad_values", "malformed"):
            getattr(merged, key).extend({**r, "file": name} for r in getattr(one, key))
    answered = set(merged.answers) | {c["pair_id"] for c in merged.conflicting}
    merged.unanswered = [p for p in known if p not in answered]
    merged.contradictions = answer_contradictions(known, merged.answers, find_contradictions)
    return merged


def answer_contradictions(known: dict, answers: dict[str, str], find) -> list[dict]:
    """Contradictions among the answers, named by pair ids."""
    index: dict[str, int] = {}
    must, cannot, must_ids, cannot_ids = [], [], [], []
    for pid, answer in answers.items():
        if answer not in ("same", "different"):
            continue
        a = index.setdefault(known[pid]["image_id_a"], len(index))
        b = index.setdefault(known[pid]["image_id_b"], len(index))
        (must if answer == "same" else cannot).append((a, b))
        (must_ids if answer == "same" else cannot_ids).append(pid)
    if not cannot or not must:
        return []
    _, found, _ = find(len(index), must, cannot)
    pair_of = {tuple(sorted(p)): pid for p, pid in zip(must, must_ids, strict=True)}
    cannot_of = {tuple(sorted(p)): pid for p, pid in zip(cannot, cannot_ids, strict=True)}
    out = []
    for item in found:
        path = item["must_path"]
        out.append({
            "cannot_pair": cannot_of[tuple(sorted(item["cannot"]))],
            "must_pairs": [pair_of[tuple(sorted(e))] for e in zip(path, path[1:], strict=False)],
        })  # fmt: skip
    return out


def write_answers(path: str, answers: dict[str, str]) -> None:
    """``pair_id,answer`` rows, atomically (the annotation page saves with this)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(ANSWER_COLUMNS)
    writer.writerows(sorted(answers.items()))
    rio.write_bytes_atomic(path, text.getvalue().encode())


__all__ = [
    "ANSWERS",
    "ANSWERS_FILE",
    "PARTIAL_FILE",
    "SPENDING",
    "AnswersReport",
    "SimulatedOracle",
    "format_bbox",
    "load_answers",
    "normalise_answer",
    "pair_boxes",
    "read_answers",
    "read_pairs_file",
    "side_by_side",
    "write_answers",
    "write_pairs_file",
]
