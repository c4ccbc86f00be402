"""``rerank_candidates``: the one entry point of re-ranking (the command, the evaluation
protocol, the demo and the tests all call it).

One pass scores the query candidates' top-K and the calibration pairs together (features
once per image, shared cache), fits the fusion on the calibration pairs (or uses a fitted
one), and ranks. ``out_dir`` holds ``features/`` (unless ``cfg.cache_dir``), ``scores/``
(resumable parts) and ``fusion.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.console import ProgressFn
from reid_ray.errors import ConfigError
from reid_ray.rerank.config import RerankConfig
from reid_ray.rerank.fusion import FusionModel, fit_fusion
from reid_ray.rerank.ranking import (
    apply_fusion,
    calibration_table,
    candidates_frame,
    select_calibration_pairs,
)
from reid_ray.rerank.scoring import as_manifest, score_pairs

logger = logging.getLogger(__name__)

FUSION_FILE = "fusion.json"


@dataclass(frozen=True)
class RerankResult:
    """What ``rerank_candidates`` returns.

    ``ranked``: query_id, rank (1-based, new order), gallery_id, global_score, local_score
    (null where not scored), fused_score, probability (calibrated P(same individual)),
    sorted by query_id and rank. ``calibration``: the scored calibration pairs (query_id,
    gallery_id, rank, global_score, local_score, fused_score, probability, same), or None.
    ``errors``: image_id, path, stage, reason. ``stats``: counts, seconds per phase, the
    calibration counts and the chosen fusion weight with the reason.
    """

    ranked: pa.Table
    calibration: pa.Table | None
    fusion: FusionModel
    errors: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)


def rerank_candidates(
    query_candidates: pa.Table,
    manifest: Any,
    cfg: RerankConfig,
    out_dir: str,
    *,
    calibration_candidates: pa.Table | None = None,
    fusion: FusionModel | None = None,
    calibration_preferred=None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> RerankResult:
    """Re-rank each query's first ``cfg.top_k`` candidates by the calibrated fusion.

    ``query_candidates``: query_id, gallery_id, score (global cosine), rank (optional).
    ``calibration_candidates``: labelled gallery leave-one-out candidates (same columns),
    labelled by the manifest's identities; the fusion is fitted on them unless ``fusion``
    is given (then they are only scored). One of the two is required: there is no ranking
    by uncalibrated scores. For every calibration query, ``result.calibration`` holds its
    highest-ranked same-identity candidate and at least its 5 highest-ranked candidates of
    other identities (``select_calibration_pairs``). ``calibration_preferred``: image ids
    the model never trained on (a checkpoint's held-out calibration images), drawn first as
    calibration queries: pairs of training images are almost all "same" at the top and
    would teach the fusion that every strong candidate is the same animal (issue 14).
    """
    t_start = time.perf_counter()
    if not isinstance(cfg, RerankConfig):
        raise ConfigError(f"cfg must be a RerankConfig, got {type(cfg).__name__}")
    if calibration_candidates is None and fusion is None:
        raise ConfigError(
            "re-ranking needs calibration candidates (labelled gallery pairs to fit the fusion "
            "on) or a fitted fusion; refusing to rank by uncalibrated scores"
        )
    if fusion is not None and not isinstance(fusion, FusionModel):
        raise ConfigError(f"fusion must be a FusionModel, got {type(fusion).__name__}")
    manifest = as_manifest(manifest)
    queries = candidates_frame(query_candidates, "the query candidates")
    calib = None
    if calibration_candidates is not None:
        calib = select_calibration_pairs(
            calibration_candidates, manifest, cfg, preferred=calibration_preferred
        )
        n_neg = int((~calib["same"]).sum())
        if fusion is None and n_neg < cfg.min_negatives:  # refused before any matching
            raise ConfigError(
                f"calibration would be fitted on {n_neg} different-individual pairs "
                f"({calib['query_id'].nunique()} labelled queries), fewer than "
                f"min_negatives={cfg.min_negatives}: give more labelled gallery candidates, "
                "raise calibration_negatives, or lower min_negatives knowingly"
            )
    import pandas as pd

    to_score = [queries.loc[queries["pos"] < cfg.top_k, ["query_id", "gallery_id"]]]
    if calib is not None:
        to_score.append(calib[["query_id", "gallery_id"]])
    pairs = pd.concat(to_score).drop_duplicates(ignore_index=True)
    scored = score_pairs(
        pa.Table.from_pandas(pairs, preserve_index=False),
        manifest,
        cfg,
        rio.join(out_dir, "scores"),
        cache_root=cfg.cache_dir or rio.join(out_dir, "features"),
        progress=progress,
        overwrite=overwrite,
    )
    local = scored.table.to_pandas()[["query_id", "gallery_id", "local_score"]]
    t_scored = time.perf_counter()

    stats: dict[str, Any] = {"scoring": scored.stats}
    if calib is not None:
        calib = calib.merge(local, on=["query_id", "gallery_id"], how="left")
        stats["calibration"] = {
            "queries": int(calib["query_id"].nunique()),
            "preferred_queries": int(
                calib.loc[
                    calib["query_id"].isin(set(calibration_preferred or ())), "query_id"
                ].nunique()
            ),
            "identities": int(calib["identity"].nunique()),
            "pairs": int(len(calib)),
            "same_pairs": int(calib["same"].sum()),
            "different_pairs": int((~calib["same"]).sum()),
            "pairs_without_local": int(calib["local_score"].isna().sum()),
        }
    if fusion is None:
        fusion = fit_fusion(
            calib["score"].to_numpy(np.float64),
            calib["local_score"].to_numpy(np.float64, na_value=np.nan),
            calib["same"].to_numpy(bool),
            calib["query_id"].to_numpy(),
            groups=calib["identity"].to_numpy(),
            method=cfg.calibration,
            folds=cfg.calibration_folds,
            margin=cfg.weight_margin,
            min_negatives=cfg.min_negatives,
            seed=cfg.seed,
        )
        reason = fusion.stats.get("weight_reason")
    else:
        reason = "a fitted fusion was given"
    fusion.save(rio.join(out_dir, FUSION_FILE))
    t_fitted = time.perf_counter()

    queries = queries.drop(columns=[c for c in ("local_score",) if c in queries.columns])
    queries = queries.merge(local, on=["query_id", "gallery_id"], how="left")
    ranked = apply_fusion(queries, fusion, cfg.top_k)
    calibration = calibration_table(calib, fusion) if calib is not None else None
    t_end = time.perf_counter()
    stats.update(
        queries=int(queries["query_id"].nunique()),
        pairs_scored=int(scored.stats["pairs_matched"]),
        pairs_cached=int(scored.stats["pairs_cached"]),
        weight=float(fusion.weight),
        weight_reason=reason,
        seconds={
            "score": round(t_scored - t_start, 3),
            "fit": round(t_fitted - t_scored, 3),
            "rank": round(t_end - t_fitted, 3),
            "total": round(t_end - t_start, 3),
        },
    )
    logger.info(
        "re-ranked %d queries: local weight %.2f (%s)", stats["queries"], fusion.weight, reason
    )
    return RerankResult(ranked, calibration, fusion, scored.errors, stats)
