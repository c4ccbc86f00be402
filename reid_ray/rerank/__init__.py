"""Local-feature re-ranking (issue 5): features once per image, a matcher actor pool,
calibrated fusion of global and local scores, and the known-vs-new decision.

Public API (heavy libraries are imported on use, not here):

* ``RerankConfig`` / ``load_rerank_config``: the settings (one loader, unknown keys refused).
* ``score_pairs(pairs, manifest, cfg, out_dir)``: pairs + ``local_score`` (Ray, resumable,
  cached features); ``score_pairs_detailed`` also returns the errors table and stats.
* ``fit_fusion(global, local, same_identity, query_ids=None)`` -> ``FusionModel``
  (``predict_proba``, ``to_dict``/``from_dict``).
* ``rerank(candidates, manifest, cfg, out_dir, fusion)``: re-ranked candidates.
* ``rerank_with_calibration(query_candidates, gallery_candidates, manifest, cfg, out_dir)``:
  scoring, calibration on labelled gallery pairs and re-ranking in one call.
* ``top_predictions(reranked, manifest, fusion)``: known individual or new, per query.
"""

from reid_ray.rerank.config import RerankConfig, load_rerank_config
from reid_ray.rerank.fusion import FusionModel, fit_fusion
from reid_ray.rerank.pipeline import (
    ScoreResult,
    rerank,
    rerank_with_calibration,
    score_pairs,
    score_pairs_detailed,
    top_predictions,
)

__all__ = [
    "FusionModel",
    "RerankConfig",
    "ScoreResult",
    "fit_fusion",
    "load_rerank_config",
    "rerank",
    "rerank_with_calibration",
    "score_pairs",
    "score_pairs_detailed",
    "top_predictions",
]
