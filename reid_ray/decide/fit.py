"""Fitting the known-vs-new decision on simulated samples, and choosing the score it
applies to.

* The threshold on the top-1 score maximises balanced accuracy, (BAKS + BAUS) / 2, by
  default, or meets a target rate of false "new" or false "known".
* A threshold-free AUROC of known vs unknown samples says how separable the two are; near
  0.5 the decision is flagged as meaningless instead of silently calling everything new.
* With re-ranking, the threshold is fitted on the global cosine and on the calibrated
  fused probability of the same calibration queries, and the score whose simulated
  hmean(BAKS, BAUS) is better decides (``DecisionConfig.gate``): re-ranking that finds the
  right animal more often can still separate known from new worse.
* The reviewers' confidence is a logistic :class:`~reid_ray.decide.calibration.Calibrator`
  of "same individual" fitted on the same samples.

Pure numpy / pandas / scikit-learn; no Ray.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd

from reid_ray.decide.calibration import Calibrator, fit_calibrator
from reid_ray.decide.config import DecisionConfig
from reid_ray.decide.rule import (
    balanced_threshold_curve,
    best_balanced_index,
    predict_with_threshold,
    threshold_at,
)
from reid_ray.decide.simulation import Samples, choose_samples

logger = logging.getLogger(__name__)

NAN = float("nan")
GLOBAL_SCORE = "cosine similarity of the top-1"
FUSED_SCORE = "calibrated P(same) of the top-1"


@dataclass
class Decision:
    """A fitted known-vs-new decision: ``predict`` applies it; ``to_dict`` is its record."""

    threshold: float
    rule: str
    target: float | None
    score: str  # what the threshold applies to
    auroc: float  # simulated known vs unknown, threshold-free
    separable: bool
    reliable: bool
    simulated: dict[str, float]  # baks, baus, false_new, false_known at the threshold
    fitted_on: str
    n_known: int
    n_unknown: int
    n_known_identities: int
    n_unknown_identities: int
    message: str
    gate: str = "global"  # which top-1 score the threshold applies to: global or fused
    curve: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def hmean(self) -> float:
        """Harmonic mean of the simulated BAKS and BAUS at the threshold (nan unfitted)."""
        return hmean(self.simulated.get("baks", NAN), self.simulated.get("baus", NAN))

    def predict(self, top_scores, top_identities, new_label: Any = "new") -> np.ndarray:
        return predict_with_threshold(top_scores, top_identities, self.threshold, new_label)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Decision:
        """The decision of a stored record (``to_dict``; its curve is not stored)."""
        names = {f.name for f in fields(cls)} - {"curve"}
        return cls(**{k: v for k, v in record.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "curve"}
        out["method"] = (
            "simulated open set: each sample image queries the gallery once with its own "
            "image (and session) removed (known) and once with its whole identity (and "
            "session) removed (unknown); threshold on the top-1 score by rule "
            f"{self.rule!r}. No query is looked at."
        )
        out["hmean"] = self.hmean
        return out


def auroc(known_scores, unknown_scores) -> float:
    """Known (positive) vs unknown top-1 scores, scikit-learn's ROC AUC; nan when either
    side is empty."""
    from sklearn.metrics import roc_auc_score

    k = np.asarray(known_scores, dtype=np.float64)
    u = np.asarray(unknown_scores, dtype=np.float64)
    if len(k) == 0 or len(u) == 0:
        return NAN
    y = np.concatenate([np.ones(len(k)), np.zeros(len(u))])
    s = np.nan_to_num(np.concatenate([k, u]), nan=-np.inf, neginf=-1e30, posinf=1e30)
    return float(roc_auc_score(y, s))


def _index_for_rule(curve: dict[str, np.ndarray], rule: str, target: float | None) -> int:
    if rule == "balanced":
        return best_balanced_index(curve)
    eps = 1e-9
    if rule == "false_new":  # false "new" rises with the threshold: the highest that meets it
        ok = np.flatnonzero(curve["false_new"] <= float(target) + eps)
        return int(ok.max()) if len(ok) else 0
    ok = np.flatnonzero(curve["false_known"] <= float(target) + eps)  # falls with it
    return int(ok.min()) if len(ok) else len(curve["cut"]) - 1


def fit_decision(
    samples: Samples, cfg: DecisionConfig | None = None, *, score: str = "top-1 score"
) -> Decision:
    """Fit the threshold on simulated samples by ``cfg.rule``; flag a model that cannot
    separate known from unknown (AUROC < ``cfg.min_auroc``) and a fit on too few samples."""
    cfg = cfg or DecisionConfig()
    n_k, n_u = samples.n_known, samples.n_unknown
    n_kid = len(set(np.asarray(samples.known_groups).tolist()))
    n_uid = len(set(np.asarray(samples.unknown_groups).tolist()))
    common = dict(rule=cfg.rule, target=cfg.target, score=score, fitted_on=samples.fitted_on,
                  n_known=n_k, n_unknown=n_u, n_known_identities=n_kid,
                  n_unknown_identities=n_uid, info=dict(samples.info))  # fmt: skip
    if n_k == 0 or n_u == 0:
        message = (
            "no known-vs-new decision: the simulation has no sample (no individual with a "
            "second gallery image outside its session); every query is called new"
        )
        logger.warning(message)
        return Decision(threshold=NAN, auroc=NAN, separable=False, reliable=False,
                        simulated={}, message=message, **common)  # fmt: skip
    curve = balanced_threshold_curve(
        samples.known_scores, samples.known_right, samples.known_groups,
        samples.unknown_scores, samples.unknown_groups,
    )  # fmt: skip
    j = _index_for_rule(curve, cfg.rule, cfg.target)
    area = auroc(samples.known_scores, samples.unknown_scores)
    separable = bool(np.isfinite(area) and area >= cfg.min_auroc)
    reliable = min(n_k, n_u) >= cfg.min_samples
    notes = []
    if not separable:
        notes.append(
            f"the model cannot separate known from new individuals (simulated AUROC "
            f"{area:.2f} < {cfg.min_auroc:.2f}): the known/new decision is close to chance"
        )
    if not reliable:
        notes.append(
            f"the decision was fitted on only {n_k} known / {n_u} unknown samples (minimum "
            f"{cfg.min_samples}): the threshold is uncertain"
        )
    for note in notes:
        logger.warning(note)
    simulated = {key: float(curve[key][j]) for key in ("baks", "baus", "false_new", "false_known")}
    message = "; ".join(notes) or (
        f"known vs new separable (simulated AUROC {area:.2f}); threshold {threshold_at(curve, j):.4g}"
        f" by rule {cfg.rule}"
    )
    return Decision(threshold=threshold_at(curve, j), auroc=area, separable=separable,
                    reliable=reliable, simulated=simulated, message=message, curve=curve,
                    **common)  # fmt: skip


def hmean(a: float, b: float) -> float:
    """Harmonic mean of two rates; 0 when either is 0, nan when either is nan."""
    a, b = float(a), float(b)
    if not (np.isfinite(a) and np.isfinite(b)):
        return NAN
    return 0.0 if a + b <= 0 else 2.0 * a * b / (a + b)


def fit_confidence(samples: Samples, decision: Decision) -> Calibrator:
    """P(same individual | top-1 score) for reviewers: a logistic calibrator fitted on the
    simulated samples (right known samples = 1, unknown samples = 0, the two classes
    weighted equally, as the decision's balanced accuracy weighs them); where they hold one
    kind only, a steep logistic centred on the threshold."""
    right = samples.known_scores[samples.known_right]
    x = np.concatenate([right, samples.unknown_scores])
    y = np.concatenate([np.ones(len(right)), np.zeros(samples.n_unknown)])
    keep = np.isfinite(x)
    if len(np.unique(y[keep])) == 2:
        return fit_calibrator(x[keep], y[keep], "logistic", balanced=True)
    return Calibrator("logistic", a=10.0, b=-10.0 * float(decision.threshold))


def confidence_from_record(record: dict[str, Any]) -> Calibrator:
    """The confidence calibrator stored in a decision record (galleries before the
    ``decide`` stage stored the logistic's ``a``, ``b`` under ``logistic``)."""
    if "confidence" in record:
        return Calibrator.from_dict(record["confidence"])
    old = record["logistic"]
    return Calibrator("logistic", a=float(old["a"]), b=float(old["b"]))


def fit_reranked_decision(
    pairs: pd.DataFrame,
    gallery_ids,
    identity_of: dict[str, Any],
    *,
    session_of: dict[str, Any] | None = None,
    heldout_ids=None,
    cfg: DecisionConfig | None = None,
    fixed_threshold: float | None = None,
    global_decision: Decision | None = None,
) -> Decision:
    """The known-vs-new decision with re-ranking on, fitted on re-ranking's scored
    calibration pairs (``query_id, gallery_id, global_score, probability``: gallery
    images searched without themselves, every candidate scored).

    The identity is always the re-ranked top-1 (by ``probability``); which score the
    threshold applies to is chosen on the same simulation: the global cosine of the best
    candidate or the fused probability of the top-1, the fused one only when its simulated
    hmean(BAKS, BAUS) beats the global one's by ``cfg.gate_margin`` (``cfg.gate`` forces
    one). ``fixed_threshold``: a threshold on the fused probability given by the user
    (the rerank config's ``threshold``) instead of a fitted one. ``global_decision``: the
    global-only decision (fitted on the whole gallery's leave-one-out neighbours, more
    samples than the calibration queries): when the global score wins, it is returned as
    it is, so the known/new split is the global-only one and only the identities of the
    accepted queries come from the re-ranked order.
    """
    cfg = cfg or DecisionConfig()
    gates = {"global": ("global_score", GLOBAL_SCORE), "fused": ("probability", FUSED_SCORE)}
    wanted = (
        ["fused"]
        if fixed_threshold is not None
        else (list(gates) if cfg.gate == "auto" else [cfg.gate])
    )
    fits: dict[str, Decision] = {}
    for gate in wanted:
        column, label = gates[gate]
        scored = pairs[["query_id", "gallery_id"]].assign(
            score=pairs[column].to_numpy(np.float64),
            rank_score=pairs["probability"].to_numpy(np.float64),
        )
        samples = choose_samples(
            scored, gallery_ids, identity_of, session_of=session_of, heldout_ids=heldout_ids,
            cfg=cfg,
        )  # fmt: skip
        samples.fitted_on = f"re-ranking calibration pairs; {samples.fitted_on}"
        fits[gate] = replace(fit_decision(samples, cfg, score=label), gate=gate)
    if fixed_threshold is not None:
        chosen = replace(
            fits["fused"], threshold=float(fixed_threshold),
            message=f"threshold {fixed_threshold} on the fused probability, given by the config",
        )  # fmt: skip
        reason = "the threshold was given (rerank config threshold)"
    elif len(fits) == 1:
        chosen, reason = fits[wanted[0]], f"gate {cfg.gate} was asked for"
    else:
        g, f = fits["global"], fits["fused"]
        fused_better = np.isfinite(f.threshold) and (
            not np.isfinite(g.threshold)
            or np.nan_to_num(f.hmean, nan=-1.0) > np.nan_to_num(g.hmean, nan=-1.0) + cfg.gate_margin
        )
        chosen = f if fused_better else g
        if not fused_better and global_decision is not None:
            chosen = replace(global_decision, gate="global", info=dict(global_decision.info))
        reason = (
            f"simulated hmean(BAKS, BAUS): fused {f.hmean:.3f}, global {g.hmean:.3f}; the fused "
            f"score decides only when it is better by more than {cfg.gate_margin:g}"
        )
    chosen.info["gate_reason"] = reason
    chosen.info["gates"] = {
        gate: {"threshold": d.threshold, "auroc": d.auroc, "hmean": d.hmean, **d.simulated}
        for gate, d in fits.items()
    }
    logger.info("known vs new decided by the %s score (%s)", chosen.gate, reason)
    return chosen


def gate_scores(decision: Decision, global_top, fused_top) -> np.ndarray:
    """The per-query scores the decision's threshold applies to: the best global cosine or
    the top-1 fused probability, by ``decision.gate``."""
    return np.asarray(fused_top if decision.gate == "fused" else global_top, dtype=np.float64)


__all__ = [
    "FUSED_SCORE",
    "GLOBAL_SCORE",
    "Decision",
    "auroc",
    "confidence_from_record",
    "fit_confidence",
    "fit_decision",
    "fit_reranked_decision",
    "gate_scores",
    "hmean",
]
