"""The known-vs-new decision ("have we seen this individual before?") as its own calibrated
decision, fitted without looking at the queries.

Why its own: a pair calibration fitted on the gallery's own top candidates sees almost
only "same" pairs when the model was trained on the gallery, so every query clears it
(issue 14: BAUS 0.00). Here the decision is fitted on a simulation that sees "the right
animal is not in the gallery" as often as "it is":

* every sample image queries the gallery twice: once as a *known* sample (its own image
  removed, and its whole session where the manifest has ``date``, so that the match must
  come from another day, as real queries do), once as an *unknown* sample (its whole
  identity removed, and its session): the same images in both roles, so the counts match;
* the samples are images the model did not train on when the checkpoint says which
  (``heldout_ids``) and enough of them are in the gallery; otherwise the whole gallery
  (then the scores are optimistic and the record says so);
* the threshold on the top-1 score maximises balanced accuracy, (BAKS + BAUS) / 2, by
  default, or meets a target rate of false "new" or false "known";
* a threshold-free AUROC of known vs unknown samples says how separable the two are; near
  0.5 the decision is flagged as meaningless instead of silently calling everything new.

Pure numpy / pandas / scikit-learn (matplotlib for the plot); no Ray.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from reid_ray.config import check, check_choice
from reid_ray.errors import ConfigError
from reid_ray.evaluation.metrics import (
    NAN,
    balanced_threshold_curve,
    best_balanced_index,
    threshold_at,
)

logger = logging.getLogger(__name__)

RULES = ("balanced", "false_new", "false_known")


# held-out individuals the decision needs before it trusts them over the training images
# (training holds out at least this many: ``reid_ray.train.rows.calibration_identities``)
MIN_HELDOUT_IDENTITIES = 5


@dataclass(frozen=True)
class DecisionConfig:
    """How the known-vs-new threshold is chosen.

    ``rule``: ``balanced`` (max (BAKS + BAUS) / 2), ``false_new`` (at most ``target`` of
    known samples called new, as few unknowns accepted as that allows) or ``false_known``
    (at most ``target`` of unknown samples accepted, as many knowns accepted as allowed).
    ``min_auroc``: below it the model is flagged as unable to separate known from new.
    ``min_samples``: fewer simulated known or unknown samples than this is flagged
    unreliable (and logged as a warning). ``min_heldout_identities``: held-out individuals
    (with a known sample each) needed before the simulation uses held-out images only.
    ``max_samples``: sample images drawn (seeded) from a larger gallery, to bound memory.
    """

    rule: str = "balanced"
    target: float | None = None
    min_auroc: float = 0.6
    min_samples: int = 20
    min_heldout_identities: int = MIN_HELDOUT_IDENTITIES
    max_samples: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("decision rule", self.rule, RULES)
        if self.rule == "balanced":
            check(self.target is None, "decision target is only used with rule false_new or "
                  f"false_known, got target={self.target} with rule balanced")  # fmt: skip
        else:
            check(
                self.target is not None and 0.0 <= float(self.target) <= 1.0,
                f"decision rule {self.rule} needs a target rate in [0, 1], got {self.target!r}",
            )
        check(0.0 <= self.min_auroc <= 1.0, f"min_auroc must be in [0, 1], got {self.min_auroc}")
        check(self.min_samples >= 1, f"min_samples must be >= 1, got {self.min_samples}")
        check(self.max_samples >= 2, f"max_samples must be >= 2, got {self.max_samples}")


@dataclass
class Samples:
    """Simulated open-set samples: one top-1 score per sample image and role."""

    known_scores: np.ndarray
    known_right: np.ndarray  # top-1 candidate has the sample's identity
    known_groups: np.ndarray  # the sample's identity (balanced rates)
    unknown_scores: np.ndarray
    unknown_groups: np.ndarray
    fitted_on: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_known(self) -> int:
        return len(self.known_scores)

    @property
    def n_unknown(self) -> int:
        return len(self.unknown_scores)


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
    curve: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, top_scores, top_identities, new_label: Any = "new") -> np.ndarray:
        from reid_ray.evaluation.metrics import predict_with_threshold

        return predict_with_threshold(top_scores, top_identities, self.threshold, new_label)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "curve"}
        out["method"] = (
            "simulated open set: each sample image queries the gallery once with its own "
            "image (and session) removed (known) and once with its whole identity (and "
            "session) removed (unknown); threshold on the top-1 score by rule "
            f"{self.rule!r}. No query is looked at."
        )
        return out


# --------------------------------------------------------------------------------------
# simulation


def _sample_rows(ids: list[str], limit: int, seed: int) -> set[str] | None:
    if len(ids) <= limit:
        return None
    rng = np.random.default_rng(seed)
    return set(np.asarray(ids, dtype=object)[rng.choice(len(ids), limit, replace=False)].tolist())


def simulate(
    pairs: pd.DataFrame,
    gallery_ids,
    identity_of: dict[str, Any],
    *,
    session_of: dict[str, Any] | None = None,
    samples=None,
    max_samples: int = 20_000,
    seed: int = 0,
) -> Samples:
    """Known and unknown samples from scored query-gallery pairs.

    Args:
        pairs: long table ``query_id, gallery_id, score`` (higher = more likely the same
            individual): each sample image's candidates in the gallery, e.g. its top-K
            neighbours or re-ranking calibration pairs. Pairs of an image with itself are
            ignored; other non-finite scores are padding.
        gallery_ids: every gallery image id (to know whether a match remains when an image
            or session is removed, even beyond the listed candidates).
        identity_of: image id -> identity (every query and gallery id).
        session_of: image id -> session (e.g. ``date``); None or missing ids: no session,
            only the image itself is removed for its known role.
        samples: the image ids to use as samples (e.g. held-out images); None = every
            query of ``pairs``.
        max_samples: at most this many sample images (seeded draw).

    A sample image is used in both roles when its identity keeps a gallery image outside
    its own session (a match remains), so the two counts are equal. Known role: the best
    candidate outside its session, right when it has the sample's identity. Unknown role:
    the best candidate of another identity outside its session; when every listed
    candidate shares the identity, the lowest listed score (an upper bound: pessimistic).
    """
    for col in ("query_id", "gallery_id", "score"):
        if col not in pairs.columns:
            raise ConfigError(f"simulate: pairs lack the column {col!r}")
    sess = session_of or {}
    df = pairs[["query_id", "gallery_id", "score"]].copy()
    df = df[df.query_id != df.gallery_id]
    df = df[np.isfinite(df.score.to_numpy(dtype=np.float64))]
    if samples is not None:
        df = df[df.query_id.isin(set(samples))]
    chosen = _sample_rows(sorted(set(df.query_id.tolist())), max_samples, seed)
    if chosen is not None:
        df = df[df.query_id.isin(chosen)]

    # where a match remains: the identity has a gallery image outside the sample's session
    gallery_set = set(gallery_ids)
    per_id: dict[Any, dict[Any, int]] = {}
    for g in gallery_set:
        counts = per_id.setdefault(identity_of.get(g), {})
        counts[sess.get(g)] = counts.get(sess.get(g), 0) + 1

    def match_remains(q: str) -> bool:
        counts = per_id.get(identity_of.get(q), {})
        s = sess.get(q)
        removed = counts.get(s, 0) if s is not None else int(q in gallery_set)
        return sum(counts.values()) - removed > 0

    queries = pd.unique(df.query_id)
    eligible = {q for q in queries.tolist() if match_remains(q)}
    df = df[df.query_id.isin(eligible)]

    def mapped(col: str, table: dict) -> np.ndarray:
        return np.asarray([table.get(i) for i in df[col].tolist()], dtype=object)

    same_id = mapped("query_id", identity_of) == mapped("gallery_id", identity_of)
    q_sess, g_sess = mapped("query_id", sess), mapped("gallery_id", sess)
    same_sess = np.array([a is not None for a in q_sess], dtype=bool) & (q_sess == g_sess)
    df = df.assign(same=same_id.astype(bool), outside=~same_sess)

    known = df[df.outside].sort_values(
        ["query_id", "score"], ascending=[True, False], kind="stable"
    )
    known_top = known.drop_duplicates("query_id", keep="first").set_index("query_id")
    other = df[df.outside & ~df.same].groupby("query_id").score.max()
    lowest = df.groupby("query_id").score.min()
    ids = sorted(eligible & set(known_top.index.tolist()))
    u_scores = np.array([other.get(q, lowest.get(q, NAN)) for q in ids], dtype=np.float64)
    groups = np.asarray([identity_of.get(q) for q in ids], dtype=object).astype(str)
    return Samples(
        known_scores=known_top.loc[ids, "score"].to_numpy(dtype=np.float64) if ids else np.zeros(0),
        known_right=known_top.loc[ids, "same"].to_numpy(dtype=bool) if ids else np.zeros(0, bool),
        known_groups=groups,
        unknown_scores=u_scores,
        unknown_groups=groups.copy(),
        info={
            "sample_images": len(ids),
            "sessions": bool(session_of) and any(v is not None for v in sess.values()),
            "drawn_from": None if chosen is None else len(chosen),
            "without_match": int(len(queries) - len(eligible)),
        },
    )


def pairs_from_matrix(query_ids, scores: np.ndarray, cand_ids: np.ndarray) -> pd.DataFrame:
    """[Q, K] candidate lists (``None`` pads) as the long ``query_id, gallery_id, score``
    table that :func:`simulate` reads."""
    scores = np.asarray(scores, dtype=np.float64)
    cand = np.asarray(cand_ids, dtype=object)
    if scores.shape != cand.shape or scores.shape[0] != len(query_ids):
        raise ConfigError(f"scores {scores.shape} and candidates {cand.shape} do not match")
    q = np.repeat(np.asarray(query_ids, dtype=object), scores.shape[1])
    df = pd.DataFrame({"query_id": q, "gallery_id": cand.ravel(), "score": scores.ravel()})
    return df[df.gallery_id.notna()]


def choose_samples(
    pairs: pd.DataFrame,
    gallery_ids,
    identity_of: dict[str, Any],
    *,
    session_of: dict[str, Any] | None = None,
    heldout_ids=None,
    cfg: DecisionConfig | None = None,
) -> Samples:
    """:func:`simulate` on the held-out images when enough held-out individuals are in
    the gallery (the model never trained on them: their scores look like real queries'),
    else on the whole gallery; ``fitted_on`` says which."""
    cfg = cfg or DecisionConfig()
    kw = dict(session_of=session_of, max_samples=cfg.max_samples, seed=cfg.seed)
    n_heldout_ids = 0
    if heldout_ids:
        held = set(heldout_ids) & set(gallery_ids)
        sim = simulate(pairs, gallery_ids, identity_of, samples=held, **kw)
        n_heldout_ids = len(set(sim.known_groups.tolist()))
        if n_heldout_ids >= cfg.min_heldout_identities:
            sim.fitted_on = (
                f"held-out images: {sim.n_known} gallery images of {n_heldout_ids} individuals "
                "the model never trained on"
            )
            sim.info["heldout"] = True
            return sim
    sim = simulate(pairs, gallery_ids, identity_of, **kw)
    sim.fitted_on = f"gallery leave-identity-out: {sim.n_known} gallery images"
    if heldout_ids is not None:
        sim.fitted_on += (
            f" ({n_heldout_ids} held-out individuals with a match in the gallery, fewer than "
            f"{cfg.min_heldout_identities}: the model may have trained on these images, so "
            "the simulated scores are optimistic)"
        )
    else:
        sim.fitted_on += " (if the model trained on these images, the scores are optimistic)"
    sim.info["heldout"] = False
    return sim


# --------------------------------------------------------------------------------------
# decision


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


# --------------------------------------------------------------------------------------
# plot


def plot_decision(
    decision: Decision,
    path: str,
    *,
    observed: dict[str, np.ndarray] | None = None,
    title: str = "known vs new: accuracy against the threshold",
) -> str | None:
    """BAKS and BAUS against the threshold (PNG at ``path``, local or s3://): the simulated
    curves the threshold was chosen on and, when given, ``observed`` (a
    :func:`~reid_ray.evaluation.metrics.balanced_threshold_curve` of the real queries,
    evaluation only). Returns the path, or None when there is no curve to draw."""
    if not decision.curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reid_ray import io as rio

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for curve, style, label in ((decision.curve, "-", "simulated"), (observed, "--", "queries")):
        if not curve:
            continue
        # a threshold in (values[j-1], values[j]] accepts what cut j accepts: steps "pre",
        # plus the cut above the highest score (nothing accepted)
        v = curve["values"]
        x = np.append(v, v[-1] + 0.02 * max(float(v[-1] - v[0]), 1e-6))
        ax.step(x, curve["baks"], style, where="pre", color="tab:blue",
                label=f"BAKS ({label})")  # fmt: skip
        ax.step(x, curve["baus"], style, where="pre", color="tab:orange",
                label=f"BAUS ({label})")  # fmt: skip
    if np.isfinite(decision.threshold):
        ax.axvline(
            decision.threshold, color="grey", lw=1, label=f"threshold {decision.threshold:.3g}"
        )
    ax.set_xlabel(decision.score)
    ax.set_ylabel("balanced accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}\nsimulated AUROC {decision.auroc:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    rio.write_bytes_atomic(path, buf.getvalue())
    return path


__all__ = [
    "RULES",
    "Decision",
    "DecisionConfig",
    "Samples",
    "auroc",
    "choose_samples",
    "fit_decision",
    "pairs_from_matrix",
    "plot_decision",
    "simulate",
]
