"""Ranking with a fitted fusion, the calibration pairs, and the top prediction per query.

Pure pandas/numpy over candidate tables (no Ray): the Ray work is in ``scoring.py``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from reid_ray.decide.simulation import draw_preferred
from reid_ray.errors import ConfigError
from reid_ray.rerank.config import RerankConfig
from reid_ray.rerank.fusion import FusionModel, order_within_queries
from reid_ray.rerank.scoring import as_manifest, require_columns

RANKED_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("rank", pa.int32()),
        ("gallery_id", pa.string()),
        ("global_score", pa.float64()),
        ("local_score", pa.float64()),
        ("fused_score", pa.float64()),
        ("probability", pa.float64()),
    ]
)
CALIBRATION_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("gallery_id", pa.string()),
        ("rank", pa.int32()),
        ("global_score", pa.float64()),
        ("local_score", pa.float64()),
        ("fused_score", pa.float64()),
        ("probability", pa.float64()),
        ("same", pa.bool_()),
    ]
)


def identities(manifest) -> dict[str, str]:
    """image_id -> identity for the labelled rows of ``manifest`` (path or Manifest)."""
    return as_manifest(manifest).identity_of()


def candidates_frame(table: pa.Table, what: str):
    """A candidates table as pandas with string ids and ``pos``: the 0-based position of
    each row within its query by the input ``rank`` (else by descending global score)."""
    require_columns(table, ("query_id", "gallery_id", "score"), what)
    df = table.to_pandas()
    df["query_id"] = df["query_id"].astype(str)
    df["gallery_id"] = df["gallery_id"].astype(str)
    df["pos"] = rank_positions(df)
    return df


def rank_positions(df) -> np.ndarray:
    if not len(df):
        return np.zeros(0, dtype=np.int64)
    key = (
        df["rank"].to_numpy(dtype=np.float64)
        if "rank" in df.columns
        else -df["score"].to_numpy(dtype=np.float64)
    )
    order = np.lexsort((key, df["query_id"].to_numpy()))
    qs = df["query_id"].to_numpy()[order]
    starts = np.r_[0, np.nonzero(qs[1:] != qs[:-1])[0] + 1]
    pos = np.empty(len(df), dtype=np.int64)
    pos[order] = np.arange(len(qs)) - np.repeat(starts, np.diff(np.r_[starts, len(qs)]))
    return pos


def select_calibration_pairs(
    calibration_candidates: pa.Table, manifest, cfg: RerankConfig, preferred=None
):
    """The labelled gallery pairs to score for calibration (pandas, with ``same`` and the
    query's ``identity``). Per calibration query (a seeded sample of ``calibration_queries``
    labelled queries, drawn first from ``preferred``: the images the model did not train
    on, whose scores look like a real query's; self-pairs and unlabelled candidates dropped):

    * its first ``calibration_top_k`` candidates;
    * its highest-ranked same-identity candidate, wherever it is;
    * its ``calibration_negatives`` (>= 5) highest-ranked other-identity candidates: with the
      query's own identity dropped they are what an absent individual would be offered;
    * ``calibration_deep_negatives`` more other-identity candidates evenly spread over the
      deeper ranks, so the calibration sees negatives at every rank.
    """
    ident = identities(manifest)
    df = candidates_frame(calibration_candidates, "the calibration candidates")
    df = df[
        (df["query_id"] != df["gallery_id"])
        & df["query_id"].isin(ident)
        & df["gallery_id"].isin(ident)
    ].reset_index(drop=True)
    df["pos"] = rank_positions(df)
    queries = np.array(sorted(df["query_id"].unique()))
    if len(queries) > cfg.calibration_queries:
        first = np.isin(queries, list(preferred or ()))
        queries = draw_preferred(queries, cfg.calibration_queries, first, cfg.seed)
        df = df[df["query_id"].isin(set(queries))]
    df = df.sort_values(["query_id", "pos"]).reset_index(drop=True)
    df["identity"] = df["query_id"].map(ident)
    df["same"] = df["identity"].to_numpy() == df["gallery_id"].map(ident).to_numpy()
    by_query = df.groupby("query_id", sort=False)
    same_rank = by_query["same"].cumsum().where(df["same"])  # 1 for the first same row
    neg_rank = (~df["same"]).astype(int).groupby(df["query_id"]).cumsum().where(~df["same"])
    keep = np.array(
        (df["pos"] < cfg.calibration_top_k)
        | (same_rank == 1)
        | (neg_rank <= cfg.calibration_negatives),
        dtype=bool,
    )
    if cfg.calibration_deep_negatives:
        deep = (neg_rank > cfg.calibration_negatives).to_numpy()
        for idx in by_query.indices.values():
            rest = idx[deep[idx]]
            if len(rest):
                spread = np.linspace(0, len(rest) - 1, cfg.calibration_deep_negatives)
                keep[rest[np.unique(spread.round().astype(int))]] = True
    return df[keep].reset_index(drop=True)


def apply_fusion(df, fusion: FusionModel, top_k: int) -> pa.Table:
    """The ranked table (``RANKED_SCHEMA``) of a candidates frame with ``pos``, ``score`` and
    ``local_score``: each query's first ``top_k`` candidates ordered by the fused score (then
    the global one), the rest after them in their global order with a null local score."""
    if not isinstance(fusion, FusionModel):
        raise ConfigError(
            "re-ranking needs a calibrated fusion model (calibration candidates or a fitted "
            "fusion); refusing to rank by uncalibrated scores"
        )
    pos = df["pos"].to_numpy()
    in_top = pos < top_k
    local = np.where(in_top, df["local_score"].to_numpy(np.float64, na_value=np.nan), np.nan)
    glob = df["score"].to_numpy(np.float64)
    fused = fusion.fused_score(glob, local)
    prob = fusion.predict_proba(glob, local)
    _, qidx = np.unique(df["query_id"].to_numpy(), return_inverse=True)
    primary = np.where(in_top, fused + 2.0, -pos.astype(np.float64) * 1e-9 - 1.0)
    order = order_within_queries(qidx, primary, glob)
    qs = df["query_id"].to_numpy()[order]
    starts = np.r_[0, np.nonzero(qs[1:] != qs[:-1])[0] + 1] if len(qs) else np.zeros(0, int)
    new_rank = np.arange(len(qs)) - np.repeat(starts, np.diff(np.r_[starts, len(qs)])) + 1
    return pa.table(
        {
            "query_id": qs,
            "rank": new_rank.astype(np.int32),
            "gallery_id": df["gallery_id"].to_numpy()[order],
            "global_score": glob[order],
            "local_score": pa.array(local[order], pa.float64(), from_pandas=True),
            "fused_score": fused[order],
            "probability": prob[order],
        },
        schema=RANKED_SCHEMA,
    )


def calibration_table(calib, fusion: FusionModel) -> pa.Table:
    """The scored calibration pairs (``CALIBRATION_SCHEMA``), sorted by query and rank."""
    calib = calib.sort_values(["query_id", "pos"])
    glob = calib["score"].to_numpy(np.float64)
    local = calib["local_score"].to_numpy(np.float64, na_value=np.nan)
    return pa.table(
        {
            "query_id": calib["query_id"].to_numpy(),
            "gallery_id": calib["gallery_id"].to_numpy(),
            "rank": (calib["pos"].to_numpy() + 1).astype(np.int32),
            "global_score": glob,
            "local_score": pa.array(local, pa.float64(), from_pandas=True),
            "fused_score": fusion.fused_score(glob, local),
            "probability": fusion.predict_proba(glob, local),
            "same": calib["same"].to_numpy(bool),
        },
        schema=CALIBRATION_SCHEMA,
    )


def top_predictions(ranked: pa.Table, manifest, decision=None) -> pa.Table:
    """One row per query: its first candidate after re-ranking, that candidate's identity,
    the probability and the known-vs-new decision of ``decision`` (a
    ``reid_ray.decide.Decision``: its threshold on the best global cosine or on the top
    probability, by its ``gate``); without one, ``is_new`` is null (not decided)."""
    from reid_ray.decide import gate_scores

    df = ranked.to_pandas().sort_values(["query_id", "rank"])
    best_global = df.groupby("query_id", sort=False)["global_score"].max()
    df = df.drop_duplicates("query_id")
    ident = identities(manifest)
    prob = df["probability"].to_numpy(dtype=np.float64)
    if decision is None or not np.isfinite(decision.threshold):
        is_new = [None] * len(df)
    else:
        gated = gate_scores(decision, best_global.loc[df["query_id"]].to_numpy(np.float64), prob)
        is_new = (np.nan_to_num(gated, nan=-np.inf) < decision.threshold).tolist()
    return pa.table(
        {
            "query_id": pa.array(df["query_id"].astype(str), pa.string()),
            "gallery_id": pa.array(df["gallery_id"].astype(str), pa.string()),
            "predicted_identity": pa.array(
                [
                    None if new is not False else ident.get(g)
                    for g, new in zip(df["gallery_id"], is_new, strict=True)
                ],
                pa.string(),
            ),
            "probability": pa.array(prob, pa.float64()),
            "is_new": pa.array(is_new, pa.bool_()),
        }
    )
