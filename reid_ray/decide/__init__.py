"""The known-vs-new decision ("have we seen this individual before?"): the one rule, its
fit without looking at the queries, score calibration, and the record that says whether
the decision can be trusted. ``evaluate``, ``rerank``, ``identify`` and the demo call it;
nothing else decides.

- ``rule.py``: accept the top candidate when its score reaches the threshold; the
  balanced-accuracy curve a threshold is chosen on.
- ``simulation.py``: the open-set simulation (each gallery sample once with its own image
  removed, once with its whole identity removed; held-out images first).
- ``fit.py``: the threshold by rule, the separability record, the choice of the deciding
  score with re-ranking on, the reviewers' confidence.
- ``calibration.py``: the one score -> probability calibrator type.
- ``config.py``: ``DecisionConfig``.
- ``plot.py``: BAKS/BAUS against the threshold.
"""

from reid_ray.decide.calibration import Calibrator, fit_calibrator
from reid_ray.decide.config import GATES, MIN_HELDOUT_IDENTITIES, RULES, DecisionConfig
from reid_ray.decide.fit import (
    FUSED_SCORE,
    GLOBAL_SCORE,
    Decision,
    auroc,
    confidence_from_record,
    fit_confidence,
    fit_decision,
    fit_reranked_decision,
    gate_scores,
    hmean,
)
from reid_ray.decide.rule import (
    KNOWN,
    NEW,
    balanced_threshold_curve,
    known_or_new,
    predict_with_threshold,
)
from reid_ray.decide.simulation import (
    Samples,
    choose_samples,
    draw_preferred,
    pairs_from_matrix,
    simulate,
)

__all__ = [
    "FUSED_SCORE",
    "GATES",
    "GLOBAL_SCORE",
    "KNOWN",
    "MIN_HELDOUT_IDENTITIES",
    "NEW",
    "RULES",
    "Calibrator",
    "Decision",
    "DecisionConfig",
    "Samples",
    "auroc",
    "balanced_threshold_curve",
    "choose_samples",
    "draw_preferred",
    "confidence_from_record",
    "fit_calibrator",
    "fit_confidence",
    "fit_decision",
    "fit_reranked_decision",
    "gate_scores",
    "hmean",
    "known_or_new",
    "pairs_from_matrix",
    "predict_with_threshold",
    "simulate",
]
