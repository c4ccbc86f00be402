"""The known-vs-new rule and its fit (reid_ray.decide) against hand-computed cases: the
leave-identity-out simulation of a gallery's neighbour lists, the balanced threshold, and
the choice of the deciding score with re-ranking on."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from reid_ray.decide import (
    DecisionConfig,
    choose_samples,
    fit_confidence,
    fit_decision,
    fit_reranked_decision,
    gate_scores,
    known_or_new,
    pairs_from_matrix,
    predict_with_threshold,
    simulate,
)
from reid_ray.errors import ConfigError


def test_predict_with_threshold_and_known_or_new():
    scores = [0.9, 0.5, 0.4, float("nan"), 0.8]
    pred = predict_with_threshold(scores, ["a", "b", "c", "d", None], 0.5)
    assert pred.tolist() == ["a", "b", "new", "new", "new"]
    assert known_or_new(scores, 0.5).tolist() == ["known", "known", "new", "new", "known"]
    with pytest.raises(ConfigError, match="threshold"):
        predict_with_threshold([0.9], ["a"], float("nan"))
    with pytest.raises(ConfigError, match="length"):
        predict_with_threshold([0.9, 0.1], ["a"], 0.5)


def _fit(ids, identities, scores, cand):
    """The decision of a gallery from its [G, K] neighbour lists (image ids)."""
    ident = dict(zip(ids, identities, strict=True))
    samples = choose_samples(pairs_from_matrix(ids, scores, cand), ids, ident)
    return samples, fit_decision(samples)


def test_threshold_between_separated_groups():
    identities = ["a", "a", "a", "b", "b", "b", "c", "d", "d"]
    ids = [f"g{i}" for i in range(len(identities))]
    rng = np.random.default_rng(1)
    n = len(identities)
    same = np.equal.outer(np.array(identities), np.array(identities))
    sim = np.where(same, rng.uniform(0.8, 0.95, (n, n)), rng.uniform(0.1, 0.3, (n, n)))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :4]
    samples, d = _fit(ids, identities, np.take_along_axis(sim, order, 1), np.array(ids)[order])
    max_other = sim[~same].max()
    min_top_same = min(sim[i, same[i] & (np.arange(n) != i)].max() for i in range(n) if i != 6)
    assert max_other < d.threshold < min_top_same
    assert d.simulated["baks"] == 1.0 and d.simulated["baus"] == 1.0 and d.hmean == 1.0
    assert (samples.n_known, samples.n_unknown) == (8, 8)  # "c" is alone: no sample
    assert predict_with_threshold([0.9, 0.2], ["a", "b"], d.threshold).tolist() == ["a", "new"]


def test_threshold_hand_computed_with_a_wrong_neighbour():
    ids, identities = ["g0", "g1", "g2", "g3"], ["a", "a", "b", "b"]
    cand = np.array(
        [["g1", "g2", "g3"], ["g0", "g2", "g3"], ["g3", "g0", "g1"], ["g0", "g2", "g1"]],
        dtype=object,
    )
    scores = np.array([[0.9, 0.4, 0.3], [0.9, 0.5, 0.2], [0.7, 0.5, 0.4], [0.75, 0.7, 0.2]])
    # known: g0, g1, g2 right at 0.9, 0.9, 0.7; g3 wrong (0.75 from "a"): counts never.
    # unknown (best other identity): 0.4, 0.5, 0.5, 0.75. Weights 1/4 each (2 per identity).
    #   t <= 0.4: BAKS 3/4 BAUS 0   -> 0.375     (0.4, 0.5]: 3/4, 1/4 -> 0.5
    #   (0.5, 0.7]: 3/4, 3/4 -> 0.75            (0.7, 0.75]: 1/2, 3/4 -> 0.625
    #   (0.75, 0.9]: 1/2, 1 -> 0.75             t > 0.9: 0, 1 -> 0.5
    # tie between (0.5, 0.7] and (0.75, 0.9]: the lower, midpoint 0.6.
    _, d = _fit(ids, identities, scores, cand)
    assert d.threshold == pytest.approx(0.6)
    assert d.simulated["baks"] == pytest.approx(0.75)
    assert d.simulated["baus"] == pytest.approx(0.75)


def test_threshold_with_padding_and_all_same_neighbours():
    ids, identities = ["g0", "g1", "g2", "g3"], ["a", "a", "a", "b"]
    cand = np.array([["g1", "g2"], ["g0", None], ["g0", "g1"], ["g0", None]], dtype=object)
    scores = np.array([[0.9, 0.8], [0.85, -np.inf], [0.9, 0.7], [0.3, np.nan]])
    # g3 ("b", alone) is no sample. Known (all right): 0.9, 0.85, 0.9. Unknown: every listed
    # candidate is "a", so the lowest listed: 0.8, 0.85, 0.7 (pessimistic). One identity.
    #   (0.7, 0.8]: BAKS 1, BAUS 1/3      (0.8, 0.85]: 1, 2/3 (best, tied)
    #   (0.85, 0.9]: 2/3, 1 (tied)        -> the lower: midpoint 0.825
    samples, d = _fit(ids, identities, scores, cand)
    assert (samples.n_known, samples.n_unknown) == (3, 3)
    assert d.threshold == pytest.approx(0.825)
    assert d.simulated["baks"] == pytest.approx(1.0)
    assert d.simulated["baus"] == pytest.approx(2 / 3)


def test_nothing_to_simulate():
    _, d = _fit(["g0", "g1"], ["a", "b"], np.array([[0.5], [0.5]]),
                np.array([["g1"], ["g0"]], dtype=object))  # fmt: skip
    assert math.isnan(d.threshold) and "no sample" in d.message
    with pytest.raises(ConfigError, match="do not match"):
        pairs_from_matrix(["g0", "g1"], np.zeros((2, 3)), np.zeros((2, 2), dtype=object))


def test_rank_score_orders_while_score_gates():
    """With ``rank_score`` the known sample's identity comes from the re-ranked order and
    its score is the best global score (the global gate under a re-ranked order)."""
    pairs = pd.DataFrame(
        {"query_id": ["q", "q"], "gallery_id": ["x", "y"], "score": [0.9, 0.6],
         "rank_score": [0.2, 0.8]}
    )  # fmt: skip
    ident = {"q": "b", "x": "a", "y": "b", "z": "b"}
    s = simulate(pairs, ["x", "y", "z"], ident)
    assert s.known_scores.tolist() == [0.9] and s.known_right.tolist() == [True]
    assert s.unknown_scores.tolist() == [0.9]  # best other identity: x
    plain = simulate(pairs.drop(columns="rank_score"), ["x", "y", "z"], ident)
    assert plain.known_right.tolist() == [False]  # by the global order x (wrong) is first


def _calibration_pairs(fused_separates: bool, seed: int = 0) -> pd.DataFrame:
    """Scored calibration pairs of 12 identities x 3 images: the fused probability ranks
    the right candidate first everywhere; it separates known from unknown cleanly or not
    at all, while the global score separates them with some overlap."""
    rng = np.random.default_rng(seed)
    ids = [f"i{k}-{j}" for k in range(12) for j in range(3)]
    rows = []
    for q in ids:
        k = q.split("-")[0]
        for g in ids:
            if g == q:
                continue
            same = g.split("-")[0] == k
            glob = rng.uniform(0.55, 0.9) if same else rng.uniform(0.3, 0.65)
            if fused_separates:
                prob = rng.uniform(0.8, 1.0) if same else rng.uniform(0.0, 0.2)
            else:  # right first, but same and other identities overlap across queries
                prob = rng.uniform(0.3, 1.0) if same else rng.uniform(0.2, 0.9)
            rows.append((q, g, glob, prob, same))
    df = pd.DataFrame(rows, columns=["query_id", "gallery_id", "global_score", "probability",
                                     "same"])  # fmt: skip
    # the re-ranked order is right: each query's best same pair goes first
    best_same = df[df.same].groupby("query_id").probability.idxmax()
    top = df.groupby("query_id").probability.max()
    df.loc[best_same.to_numpy(), "probability"] = top.loc[best_same.index].to_numpy() + 0.001
    return df, ids, {i: i.split("-")[0] for i in ids}


@pytest.mark.parametrize("fused_separates", [True, False])
def test_the_better_score_decides(fused_separates):
    df, ids, ident = _calibration_pairs(fused_separates)
    d = fit_reranked_decision(df, ids, ident)
    gates = d.info["gates"]
    assert set(gates) == {"global", "fused"}
    better = max(gates, key=lambda g: gates[g]["hmean"])
    if fused_separates:
        assert d.gate == "fused" and gates["fused"]["hmean"] == 1.0
    else:
        assert d.gate == better == "global"
    assert d.hmean == pytest.approx(max(g["hmean"] for g in gates.values()))
    assert d.gate in d.info["gate_reason"] or "hmean" in d.info["gate_reason"]
    forced = fit_reranked_decision(df, ids, ident, cfg=DecisionConfig(gate="fused"))
    assert forced.gate == "fused" and set(forced.info["gates"]) == {"fused"}
    given = fit_reranked_decision(df, ids, ident, fixed_threshold=0.42)
    assert given.gate == "fused" and given.threshold == 0.42
    assert gate_scores(d, [0.1], [0.9]).tolist() == ([0.9] if d.gate == "fused" else [0.1])


def test_confidence_is_a_calibrator_fitted_on_the_samples():
    identities = [k for k in "abcdef" for _ in range(3)]
    ids = [f"g{i}" for i in range(len(identities))]
    rng = np.random.default_rng(0)
    n = len(ids)
    same = np.equal.outer(np.array(identities), np.array(identities))
    sim = np.where(same, rng.uniform(0.7, 0.9, (n, n)), rng.uniform(0.1, 0.5, (n, n)))
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    samples, d = _fit(ids, identities, np.take_along_axis(sim, order, 1), np.array(ids)[order])
    conf = fit_confidence(samples, d)
    assert conf.kind == "logistic"
    assert conf.predict(np.array([0.85]))[0] > 0.5 > conf.predict(np.array([0.2]))[0]
