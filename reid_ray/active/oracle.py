"""Who answers "same animal or not?": a simulated oracle, or people via two files.

The simulated oracle is the only code that reads ground-truth identities during an AL run
(benchmarks). The human round trip:

- ``write_pairs_file``: ``pairs.csv`` with ``pair_id,image_id_a,path_a,image_id_b,path_b,
  thumbnail`` and one side-by-side JPEG per pair under ``thumbs/``;
- the annotator (or ``reid_ray.active.annotate``) writes ``answers.csv``:
  ``pair_id,answer`` with ``same``, ``different`` or ``unsure``;
- ``read_answers`` validates it and reports every problem (unknown pair ids, duplicates,
  conflicting duplicates, bad values, malformed rows, unanswered pairs, contradictions such
  as A=B, B=C, A!=C); no row is dropped without being listed in the report.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field

import numpy as np

from reid_ray import io as rio
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

PAIRS_COLUMNS = ["pair_id", "image_id_a", "path_a", "image_id_b", "path_b", "thumbnail"]
ANSWER_COLUMNS = ["pair_id", "answer"]
ANSWERS = ("same", "different", "unsure")
ALIASES = {"s": "same", "d": "different", "u": "unsure"}
THUMB_SIDE = 192


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


def _thumb(path: str, side: int) -> np.ndarray:
    from reid_ray.data import load_image, resize_image

    img = load_image(path)
    h, w = img.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = resize_image(img, size)
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    y, x = (side - size[0]) // 2, (side - size[1]) // 2
    canvas[y : y + size[0], x : x + size[1]] = small
    return canvas


def side_by_side(path_a: str, path_b: str, side: int = THUMB_SIDE) -> bytes:
    """A JPEG with both images letterboxed side by side (a gap between them)."""
    from PIL import Image

    gap = np.full((side, 8, 3), 255, dtype=np.uint8)
    row = np.concatenate([_thumb(path_a, side), gap, _thumb(path_b, side)], axis=1)
    buf = io.BytesIO()
    Image.fromarray(row).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_pairs_file(
    folder: str, pairs, image_ids, paths, *, round_index: int = 0, thumbnails: bool = True
) -> dict:
    """Write ``folder/pairs.csv`` (and ``folder/thumbs/<pair_id>.jpg``) for ``pairs`` of
    row indices into ``image_ids``/``paths``. An image that cannot be read gets no
    thumbnail (its row says why in the log and ``thumbnail`` is empty); returns counts."""
    rows, n_thumb_errors = [], 0
    for k, (a, b) in enumerate(pairs):
        pid = pair_id(round_index, k)
        thumb = ""
        if thumbnails:
            rel = f"thumbs/{pid}.jpg"
            try:
                rio.write_bytes_atomic(rio.join(folder, rel), side_by_side(paths[a], paths[b]))
                thumb = rel
            except Exception as exc:  # noqa: BLE001 - a bad image must not stop the file
                n_thumb_errors += 1
                logger.warning("no thumbnail for %s: %s", pid, exc)
        rows.append([pid, image_ids[a], paths[a], image_ids[b], paths[b], thumb])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(PAIRS_COLUMNS)
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

    answers: dict[str, str] = field(default_factory=dict)  # pair_id -> same/different/unsure
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
        return not any(c[k] for k in c if k not in ("rows", "same", "different", "unsure"))

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
        pid, raw = row[0].strip(), row[1].strip().lower()
        answer = ALIASES.get(raw, raw)
        if pid not in known:
            report.unknown_ids.append({"line": line, "pair_id": pid})
            continue
        if answer not in ANSWERS:
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


def answer_contradictions(known: dict, answers: dict[str, str], find) -> list[dict]:
    """Contradictions among the answers, named by pair ids."""
    index: dict[str, int] = {}
    must, cannot, must_ids, cannot_ids = [], [], [], []
    for pid, answer in answers.items():
        if answer == "unsure":
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
    "AnswersReport",
    "SimulatedOracle",
    "read_answers",
    "read_pairs_file",
    "side_by_side",
    "write_answers",
    "write_pairs_file",
]
