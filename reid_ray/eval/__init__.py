"""Evaluation: retrieval (mAP, CMC), open-set (BAKS/BAUS), cluster metrics, and splits.

Pure functions over numpy and pandas, testable without Ray; nothing heavier is imported.
"""

from reid_ray.eval.metrics import (
    cluster_metrics,
    open_set_metrics,
    predict_with_threshold,
    retrieval_metrics,
    retrieval_metrics_from_similarity,
    select_threshold_loo,
)
from reid_ray.eval.splits import SPLIT_NAMES, make_split, read_split, write_split

__all__ = [
    "SPLIT_NAMES",
    "cluster_metrics",
    "make_split",
    "open_set_metrics",
    "predict_with_threshold",
    "read_split",
    "retrieval_metrics",
    "retrieval_metrics_from_similarity",
    "select_threshold_loo",
    "write_split",
]
