"""What an AL run keeps and hands over: each round's answers (once), and the
pseudo-labelled manifest with the constraints behind it.

- A round record (``round.json``) holds only the pairs answered in that round (``must``,
  ``cannot``, ``asked``); ``answers_so_far`` gathers them over the rounds, each pair once
  (records of older runs, which repeated every earlier answer, read the same).
- ``pseudo_labels.csv``: every train image with a provisional identity (``p<k>`` for a
  pseudo-cluster, ``s<k>`` for an image in no cluster), split ``train`` for the images in
  clusters large enough to train on (empty otherwise), so ``reid-ray train`` trains on the
  clusters and ``reid-ray gallery build`` takes every image; ``constraints.csv``: every
  answer it rests on (``image_id_a,image_id_b,answer,round``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from reid_ray import io as rio

PSEUDO_FILE = "pseudo_labels.csv"
CONSTRAINTS_FILE = "constraints.csv"
PASSED_THROUGH = ("species", "viewpoint", "date")


def answers_so_far(history: list[dict]) -> tuple[list, list, list]:
    """``(must, cannot, asked)`` image-id pairs of all finished rounds, each pair once, in
    the order they were answered."""
    out: tuple[dict, dict, dict] = ({}, {}, {})
    for record in history:
        for bucket, key in zip(out, ("must", "cannot", "asked"), strict=True):
            for a, b in record.get(key, []):
                bucket.setdefault((a, b) if a < b else (b, a), [a, b])
    return tuple(list(bucket.values()) for bucket in out)  # type: ignore[return-value]


def _sizes(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, int)


def trainable(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Rows in a pseudo-cluster of at least ``min_size`` images."""
    sizes = _sizes(labels)
    if not len(sizes):
        return np.zeros(len(labels), dtype=bool)
    return (labels >= 0) & (sizes[np.clip(labels, 0, None)] >= min_size)


def _bbox_text(values) -> list[str]:
    from reid_ray.active.oracle import format_bbox

    return [format_bbox(b) for b in values]


def write_training_rows(
    path: str, table: pa.Table, ids: np.ndarray, labels: np.ndarray, min_size: int
) -> dict:
    """The round's training manifest: ``train`` rows of clusters >= ``min_size``."""
    import pandas as pd

    keep = trainable(labels, min_size)
    row_of = {i: n for n, i in enumerate(table["image_id"].to_pylist())}
    rows = [row_of[i] for i in ids[keep].tolist()]
    sub = table.take(pa.array(rows, pa.int64())) if rows else table.slice(0, 0)
    df = pd.DataFrame({
        "image_id": sub["image_id"].to_pylist(),
        "path": sub["path"].to_pylist(),
        "identity": [f"p{int(v)}" for v in labels[keep]],
        "split": "train",
    })  # fmt: skip
    bbox = sub["bbox"].to_pylist()
    if any(b is not None for b in bbox):
        df["bbox"] = _bbox_text(bbox)
    rio.write_bytes_atomic(path, df.to_csv(index=False).encode())
    return {
        "pseudo_images": int(keep.sum()),
        "pseudo_identities": int(len(set(labels[keep].tolist()))),
    }


def write_pseudo_labels(
    path: str, table: pa.Table, ids: np.ndarray, labels: np.ndarray, min_size: int,
    answered: dict[str, int] | None = None,
) -> dict:  # fmt: skip
    """Every row of ``ids`` with a provisional identity (see the module's docstring);
    ``answered``: image id -> how many answers name it (a column, 0 when absent)."""
    import pandas as pd

    answered = answered or {}
    row_of = {i: n for n, i in enumerate(table["image_id"].to_pylist())}
    sub = table.take(pa.array([row_of[i] for i in ids.tolist()], pa.int64()))
    sizes = _sizes(labels)
    keep = trainable(labels, min_size)
    singles = np.cumsum(labels < 0) - 1
    identity = [f"p{int(v)}" if v >= 0 else f"s{int(singles[n])}" for n, v in enumerate(labels)]
    df = pd.DataFrame({
        "image_id": sub["image_id"].to_pylist(),
        "path": sub["path"].to_pylist(),
        "identity": identity,
        "split": np.where(keep, "train", ""),
        "cluster_size": [int(sizes[v]) if v >= 0 else 1 for v in labels],
        "answers": [answered.get(i, 0) for i in ids.tolist()],
    })  # fmt: skip
    bbox = sub["bbox"].to_pylist()
    if any(b is not None for b in bbox):
        df["bbox"] = _bbox_text(bbox)
    for name in PASSED_THROUGH:
        values = sub[name].to_pylist()
        if any(v is not None for v in values):
            df[name] = values
    rio.write_bytes_atomic(path, df.to_csv(index=False).encode())
    return {
        "images": len(df),
        "identities": int(df["identity"].nunique()),
        "in_clusters": int((labels >= 0).sum()),
        "trainable": int(keep.sum()),
    }


def write_constraints(path: str, history: list[dict]) -> int:
    """Every answer of the run, one row each: ``image_id_a,image_id_b,answer,round``."""
    import csv
    import io

    rows, seen = [], set()
    for record in history:
        same = {tuple(p) for p in record.get("must", [])}
        different = {tuple(p) for p in record.get("cannot", [])}
        for a, b in record.get("asked", []):
            key = (a, b) if a < b else (b, a)
            if key in seen:  # older records repeated earlier rounds' answers
                continue
            seen.add(key)
            answer = "same" if (a, b) in same else "different" if (a, b) in different else "unsure"
            rows.append([a, b, answer, record["round"]])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image_id_a", "image_id_b", "answer", "round"])
    writer.writerows(rows)
    rio.write_bytes_atomic(path, text.getvalue().encode())
    return len(rows)


def answer_counts(history: list[dict]) -> dict[str, int]:
    """Image id -> the number of answers (same, different or unsure) that name it."""
    out: dict[str, int] = {}
    for a, b in answers_so_far(history)[2]:
        out[a] = out.get(a, 0) + 1
        out[b] = out.get(b, 0) + 1
    return out


__all__ = [
    "CONSTRAINTS_FILE",
    "PSEUDO_FILE",
    "answer_counts",
    "answers_so_far",
    "trainable",
    "write_constraints",
    "write_pseudo_labels",
    "write_training_rows",
]
