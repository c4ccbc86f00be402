"""Local-feature re-ranking: features once per image, a matcher actor pool, and a
calibrated fusion of global and local scores.

One entry point::

    from reid_ray.rerank import rerank_candidates, RerankResult, RerankConfig, FusionModel
    result = rerank_candidates(query_candidates, manifest, cfg, out_dir,
                               calibration_candidates=gallery_loo_candidates)

Layout: ``config`` (settings), ``registry`` (the table of extractors and matcher weights),
``features``/``matchers``/``cache`` (pure kernels), ``actors`` and ``scoring`` (the Ray
pools, resumable), ``fusion`` (scikit-learn calibration, the fusion weight), ``ranking``
(ordering, calibration pairs, top predictions), ``api`` (the entry point), ``commands``
(``reid-ray rerank``), ``viz`` (match pictures).
"""

from reid_ray.rerank.api import RerankResult, rerank_candidates
from reid_ray.rerank.config import RerankConfig, load_rerank_config
from reid_ray.rerank.fusion import FusionModel

__all__ = [
    "FusionModel",
    "RerankConfig",
    "RerankResult",
    "load_rerank_config",
    "rerank_candidates",
]
