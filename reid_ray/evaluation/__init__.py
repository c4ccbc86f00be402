"""Evaluation: the metrics (mAP, CMC, BAKS/BAUS, AUROC, cluster metrics) and the protocol.

``metrics.py`` holds pure functions over numpy (no Ray, nothing heavy imported);
``protocol.py`` runs the benchmark protocol (embed + index + search [+ re-rank] + metrics)
behind ``reid-ray evaluate``. Names are imported on first use.
"""

from reid_ray.lazy import lazy_getattr

_EXPORTS = {
    "cluster_metrics": "metrics",
    "open_set_metrics": "metrics",
    "retrieval_metrics": "metrics",
    "retrieval_metrics_from_similarity": "metrics",
    "evaluate": "protocol",
    "score_ranking": "protocol",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
