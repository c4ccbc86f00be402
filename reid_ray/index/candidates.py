"""Candidates: the top-K gallery items of every query, as a long Parquet table.

Schema (docs/design.md, Contracts): ``query_id`` string, ``rank`` int32 (1 = best),
``gallery_id`` string, ``score`` float32 (cosine similarity, higher = closer). Padding (a
gallery smaller than K) is not written: a query has ``min(K, gallery size)`` rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray import parts
from reid_ray.errors import ConfigError, OutputError

CANDIDATES_DIR = "candidates"
CANDIDATES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("rank", pa.int32()),
        ("gallery_id", pa.string()),
        ("score", pa.float32()),
    ]
)


def candidates_table(query_ids, scores: np.ndarray, gallery_ids: np.ndarray) -> pa.Table:
    """[Q] query ids, [Q, K] scores and gallery ids (``None`` pads) -> long table."""
    qids = np.asarray([str(i) for i in query_ids], dtype=object)
    scores = np.asarray(scores, dtype=np.float32)
    gallery_ids = np.asarray(gallery_ids, dtype=object)
    if scores.ndim != 2 or scores.shape[0] != len(qids) or gallery_ids.shape != scores.shape:
        raise ConfigError(
            f"scores {scores.shape} and gallery_ids {gallery_ids.shape} must be [Q={len(qids)}, K]"
        )
    valid = np.array([g is not None for g in gallery_ids.ravel()], dtype=bool).reshape(
        gallery_ids.shape
    )
    q_idx, r_idx = np.nonzero(valid)
    return pa.table(
        {
            "query_id": pa.array(qids[q_idx].tolist(), pa.string()),
            "rank": pa.array((r_idx + 1).astype(np.int32), pa.int32()),
            "gallery_id": pa.array(gallery_ids[q_idx, r_idx].tolist(), pa.string()),
            "score": pa.array(scores[q_idx, r_idx], pa.float32()),
        },
        schema=CANDIDATES_SCHEMA,
    )


def candidates_folder(path: str) -> str:
    """``path/candidates`` when it exists, else ``path`` (a folder of candidate parts)."""
    sub = rio.join(path, CANDIDATES_DIR)
    return sub if parts.list_parts(sub) else path


def read_candidates(path: str) -> pa.Table:
    """Every candidate part under ``path`` (a search/evaluate output or a parts folder)."""
    folder = candidates_folder(path)
    files = parts.list_parts(folder)
    if not files:
        raise OutputError(f"no candidates under {path}: run `reid-ray search` first")
    return parts.read_parts(folder, CANDIDATES_SCHEMA, columns=CANDIDATES_SCHEMA.names, files=files)


def candidates_to_matrix(table: pa.Table, query_ids, k: int | None = None):
    """Long candidates -> ([Q, K] scores, [Q, K] gallery ids) in the order of ``query_ids``
    (``-inf``/``None`` pads; queries absent from the table get only padding)."""
    qids = [str(i) for i in query_ids]
    rows = table.to_pydict()
    width = k or (max(rows["rank"]) if rows["rank"] else 0)
    pos = {q: n for n, q in enumerate(qids)}
    scores = np.full((len(qids), width), -np.inf, dtype=np.float32)
    ids = np.full((len(qids), width), None, dtype=object)
    for q, r, g, s in zip(
        rows["query_id"], rows["rank"], rows["gallery_id"], rows["score"], strict=True
    ):
        n = pos.get(q)
        if n is not None and 1 <= r <= width:
            scores[n, r - 1] = s
            ids[n, r - 1] = g
    return scores, ids
