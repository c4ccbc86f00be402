"""The open-set simulation a known-vs-new threshold is fitted on, without the queries.

A pair calibration fitted on the gallery's own top candidates sees almost only "same"
pairs when the model was trained on the gallery, so every query clears it (BAUS 0.00
measured). Here the decision is fitted on a simulation that sees "the right animal is not
in the gallery" as often as "it is":

* every sample image queries the gallery twice: once as a *known* sample (its own image
  removed, and its whole session where the manifest has ``date``, so that the match must
  come from another day, as real queries do), once as an *unknown* sample (its whole
  identity removed, and its session): the same images in both roles, so the counts match;
* the samples are images the model did not train on when the checkpoint says which
  (``heldout_ids``) and enough of them are in the gallery; otherwise the whole gallery
  (then the scores are optimistic and the record says so).

Pure numpy / pandas; no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from reid_ray.decide.config import DecisionConfig
from reid_ray.errors import ConfigError

NAN = float("nan")


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


def _sample_rows(ids: list[str], limit: int, seed: int) -> set[str] | None:
    if len(ids) <= limit:
        return None
    rng = np.random.default_rng(seed)
    return set(np.asarray(ids, dtype=object)[rng.choice(len(ids), limit, replace=False)].tolist())


def draw_preferred(items: np.ndarray, n: int, preferred_mask: np.ndarray, seed: int):
    """``n`` of ``items`` (sorted, seeded): those where ``preferred_mask`` holds first (a
    sample of them when there are more), the rest drawn from the others."""
    rng = np.random.default_rng(seed)
    chosen = items[preferred_mask]
    if len(chosen) >= n:
        return np.sort(rng.choice(chosen, size=n, replace=False))
    rest = items[~preferred_mask]
    fill = rng.choice(rest, size=min(n - len(chosen), len(rest)), replace=False)
    return np.sort(np.concatenate([chosen, fill]))


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
            ignored; other non-finite scores are padding. An optional ``rank_score``
            column orders the candidates (which one is the top-1 and so whether the
            known sample is right) while ``score`` stays what the threshold applies to:
            re-ranked identities under the global score's decision.
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
    rank_col = "rank_score" if "rank_score" in pairs.columns else "score"
    df = pairs[["query_id", "gallery_id", "score"]].copy()
    if rank_col != "score":
        df["rank_score"] = np.nan_to_num(pairs[rank_col].to_numpy(np.float64), nan=-np.inf)
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

    order = ["query_id", rank_col] + (["score"] if rank_col != "score" else [])
    known = df[df.outside].sort_values(
        order, ascending=[True] + [False] * (len(order) - 1), kind="stable"
    )
    known_top = known.drop_duplicates("query_id", keep="first").set_index("query_id")
    if rank_col != "score":  # the threshold sees the best score, whichever ranks first
        known_top["score"] = known.groupby("query_id").score.max()
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


__all__ = ["Samples", "choose_samples", "draw_preferred", "pairs_from_matrix", "simulate"]
