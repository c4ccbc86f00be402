"""The known-vs-new decision (reid_ray.decide): the simulation leaves whole
identities (and sessions) out, the threshold rules against hand-computed and brute-force
values, AUROC against scikit-learn, the no-separation flag, and issue 14's failing case:
a real model trained on the gallery rows, with unknown individuals among the queries."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from reid_ray.decide import (
    DecisionConfig,
    Samples,
    auroc,
    choose_samples,
    fit_decision,
    pairs_from_matrix,
    predict_with_threshold,
    simulate,
)
from reid_ray.decide.plot import plot_decision
from reid_ray.errors import ConfigError
from reid_ray.evaluation.metrics import open_set_metrics


def _pairs(rows):
    return pd.DataFrame(rows, columns=["query_id", "gallery_id", "score"])


def _samples(ks, kr, kg, us, ug):
    return Samples(
        np.asarray(ks, float), np.asarray(kr, bool), np.asarray(kg, object).astype(str),
        np.asarray(us, float), np.asarray(ug, object).astype(str),
    )  # fmt: skip


IDENT = {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c1": "C"}


def test_simulate_leaves_the_whole_identity_out():
    pairs = _pairs([
        ("a1", "a1", 1.0), ("a1", "b1", 0.8), ("a1", "a2", 0.7), ("a1", "c1", 0.3),
        ("a2", "a1", 0.9), ("a2", "c1", 0.6), ("a2", "b2", 0.2),
        ("b1", "b2", 0.95), ("b1", "a1", 0.8),
        ("b2", "b1", 0.95),  # every listed candidate is B: the lowest listed is the bound
        ("c1", "a2", 0.6),  # C has no second image: no match remains, no sample
    ])  # fmt: skip
    sim = simulate(pairs, list(IDENT), IDENT)
    assert sim.n_known == sim.n_unknown == 4  # the same images in both roles: balanced
    got = dict(zip(["a1", "a2", "b1", "b2"], sim.known_scores, strict=True))
    assert got == {"a1": 0.8, "a2": 0.9, "b1": 0.95, "b2": 0.95}  # self pair ignored
    assert sim.known_right.tolist() == [False, True, True, True]
    # unknown role: the best candidate of another identity (whole identity removed)
    assert sim.unknown_scores.tolist() == [0.8, 0.6, 0.8, 0.95]
    assert sim.known_groups.tolist() == ["A", "A", "B", "B"]
    assert sim.info["without_match"] == 1


def test_simulate_leaves_the_session_out():
    ident = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B", "c1": "C"}
    day = {"a1": "d1", "a2": "d1", "a3": "d2", "b1": "d1", "b2": "d1", "c1": "d2"}
    pairs = _pairs([
        ("a1", "a2", 0.9), ("a1", "b1", 0.85), ("a1", "a3", 0.5), ("a1", "c1", 0.4),
        ("a3", "a1", 0.5), ("a3", "c1", 0.45), ("a3", "b2", 0.3),
        ("b1", "b2", 0.9), ("b1", "a1", 0.5),  # B seen on one day only: no known sample
    ])  # fmt: skip
    sim = simulate(pairs, list(ident), ident, session_of=day)
    # a1: a2 and b1 share its day and are removed: the match must come from day 2
    assert sim.n_known == sim.n_unknown == 2
    assert sim.known_scores.tolist() == [0.5, 0.5] and sim.known_right.all()
    assert sim.unknown_scores.tolist() == [0.4, 0.3]  # c1 shares a3's day: removed
    assert sim.info["sessions"] is True
    no_sessions = simulate(pairs, list(ident), ident)
    assert no_sessions.n_known == 3 and no_sessions.known_scores[0] == 0.9


def test_simulate_draws_at_most_max_samples_and_pairs_from_matrix():
    rng = np.random.default_rng(0)
    ids = [f"i{n}" for n in range(40)]
    ident = {i: f"id{n // 4}" for n, i in enumerate(ids)}
    scores = rng.random((40, 6))
    cand = np.array([[ids[(n + j + 1) % 40] for j in range(6)] for n in range(40)], dtype=object)
    cand[0, 5] = None
    pairs = pairs_from_matrix(ids, scores, cand)
    assert len(pairs) == 40 * 6 - 1
    sim = simulate(pairs, ids, ident, max_samples=10, seed=1)
    assert sim.n_known == sim.n_unknown == 10 and sim.info["drawn_from"] == 10
    again = simulate(pairs, ids, ident, max_samples=10, seed=1)
    np.testing.assert_array_equal(sim.known_scores, again.known_scores)
    with pytest.raises(ConfigError, match="do not match"):
        pairs_from_matrix(ids[:3], scores, cand)


def test_balanced_threshold_hand_computed():
    d = fit_decision(_samples([0.9, 0.8], [1, 1], ["A", "B"], [0.3, 0.5], ["A", "B"]))
    assert d.threshold == pytest.approx(0.65)
    assert d.simulated["baks"] == 1.0 and d.simulated["baus"] == 1.0
    assert d.auroc == 1.0 and d.separable and d.n_known == d.n_unknown == 2
    # a wrong top-1 never counts as known-right: the threshold cannot buy it
    d = fit_decision(_samples([0.9, 0.4], [1, 0], ["A", "B"], [0.3, 0.5], ["A", "B"]))
    assert d.simulated["baks"] == 0.5 and d.simulated["baus"] == 1.0
    assert 0.5 < d.threshold <= 0.9


def _brute_force(s: Samples, t: float) -> dict:
    """The decision's rates at threshold t via predict_with_threshold + open_set_metrics."""
    k_top = np.where(s.known_right, s.known_groups, "someone-else")
    pred_k = predict_with_threshold(s.known_scores, k_top, t)
    pred_u = predict_with_threshold(s.unknown_scores, np.full(s.n_unknown, "x"), t)
    unknown_true = np.char.add("u-", s.unknown_groups.astype(str))
    m = open_set_metrics(
        np.concatenate([s.known_groups, unknown_true]), np.concatenate([pred_k, pred_u]),
        set(s.known_groups.tolist()),
    )  # fmt: skip
    rejected = pd.Series(pred_k == "new").groupby(s.known_groups).mean().mean()
    return {**m, "false_new": float(rejected), "false_known": 1 - m["baus"]}


@pytest.fixture
def random_samples():
    rng = np.random.default_rng(7)
    n = 60
    groups = np.array([f"g{i % 12}" for i in range(n)])
    return _samples(
        rng.normal(1.0, 0.6, n), rng.random(n) < 0.8, groups, rng.normal(0.0, 0.6, n), groups
    )


def test_balanced_threshold_is_the_brute_force_optimum(random_samples):
    s = random_samples
    d = fit_decision(s)
    grid = np.unique(np.concatenate([s.known_scores, s.unknown_scores]))
    best = max((_brute_force(s, t)["baks"] + _brute_force(s, t)["baus"]) / 2 for t in grid)
    at = _brute_force(s, d.threshold)
    assert (at["baks"] + at["baus"]) / 2 == pytest.approx(best)
    assert at["baks"] == pytest.approx(d.simulated["baks"])
    assert at["baus"] == pytest.approx(d.simulated["baus"])


@pytest.mark.parametrize(("rule", "target"), [("false_new", 0.1), ("false_known", 0.05)])
def test_target_rate_thresholds(random_samples, rule, target):
    s = random_samples
    d = fit_decision(s, DecisionConfig(rule=rule, target=target))
    at = _brute_force(s, d.threshold)
    assert at[rule] <= target + 1e-9
    assert at[rule] == pytest.approx(d.simulated[rule])
    # the extreme threshold that still meets the target: one step further breaks it
    grid = np.unique(np.concatenate([s.known_scores, s.unknown_scores]))
    if rule == "false_new":  # the highest: the next cut (rejecting one more score) breaks it
        higher = grid[grid > d.threshold]  # higher[0] accepts what the midpoint accepts
        assert all(_brute_force(s, t)["false_new"] > target for t in higher[1:2])
    else:  # the lowest: any lower accepts too many unknowns
        lower = grid[grid < d.threshold]
        assert all(_brute_force(s, t)["false_known"] > target for t in lower[-1:])
    zero = fit_decision(s, DecisionConfig(rule=rule, target=0.0))
    if rule == "false_new":
        assert zero.threshold <= s.known_scores.min()
    else:
        assert zero.threshold > s.unknown_scores.max()


def test_auroc_matches_sklearn(random_samples):
    from sklearn.metrics import roc_auc_score

    s = random_samples
    y = np.r_[np.ones(s.n_known), np.zeros(s.n_unknown)]
    want = roc_auc_score(y, np.r_[s.known_scores, s.unknown_scores])
    assert auroc(s.known_scores, s.unknown_scores) == pytest.approx(want)
    assert fit_decision(s).auroc == pytest.approx(want)
    assert np.isnan(auroc([], [0.1]))
    assert auroc([0.2, 0.3], [0.25]) == pytest.approx(0.5)


def test_no_separation_is_flagged_not_silent():
    rng = np.random.default_rng(3)
    groups = np.array([f"g{i % 10}" for i in range(200)])
    same = rng.random(200)
    s = _samples(same, np.ones(200, bool), groups, rng.permutation(same), groups)
    d = fit_decision(s)
    assert 0.4 < d.auroc < 0.6 and not d.separable
    assert "cannot separate" in d.message and d.to_dict()["separable"] is False
    few = fit_decision(_samples([0.9], [1], ["A"], [0.1], ["A"]))
    assert few.separable and not few.reliable and "only 1 known" in few.message
    empty = fit_decision(_samples([], [], [], [], []))
    assert np.isnan(empty.threshold) and "no sample" in empty.message


def test_heldout_images_are_preferred_when_enough(random_samples):
    rng = np.random.default_rng(0)
    ids = [f"i{n}" for n in range(48)]
    ident = {i: f"id{n // 4}" for n, i in enumerate(ids)}
    pairs = pd.DataFrame(
        [(q, g, float(rng.random())) for q, g in itertools.product(ids, ids) if q != g],
        columns=["query_id", "gallery_id", "score"],
    )
    held = set(ids[:24])  # 6 individuals never trained on
    sim = choose_samples(pairs, ids, ident, heldout_ids=held)
    assert sim.info["heldout"] and sim.fitted_on.startswith("held-out") and sim.n_known == 24
    few = choose_samples(pairs, ids, ident, heldout_ids=set(ids[:8]))  # 2 individuals
    assert not few.info["heldout"] and "fewer than 5" in few.fitted_on and few.n_known == 48
    plain = choose_samples(pairs, ids, ident)
    assert "leave-identity-out" in plain.fitted_on and plain.n_known == 48


def test_plot_and_record(random_samples, tmp_path):
    d = fit_decision(random_samples)
    path = plot_decision(d, str(tmp_path / "plot.png"), observed=d.curve)
    assert path and (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = d.to_dict()
    for key in ("threshold", "rule", "auroc", "separable", "fitted_on", "n_known", "method"):
        assert key in record
    assert "curve" not in record


def test_config_is_validated():
    with pytest.raises(ConfigError, match="rule must be one of"):
        DecisionConfig(rule="youden")
    with pytest.raises(ConfigError, match="needs a target"):
        DecisionConfig(rule="false_new")
    with pytest.raises(ConfigError, match="only used with"):
        DecisionConfig(target=0.1)


# --------------------------------------------------------------------------------------
# issue 14: a model trained on the gallery rows


def _trained_embeddings():
    """A real tiny model (MLP, sub-centre-free ArcFace from pytorch-metric-learning)
    trained to convergence on the gallery rows only; known queries are new views of the
    gallery individuals, unknown queries individuals it never saw."""
    import torch
    from pytorch_metric_learning.losses import ArcFaceLoss

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n_known, n_unknown, dim = 24, 12, 32
    protos = rng.normal(size=(n_known + n_unknown, dim))

    def views(ident: int, n: int) -> np.ndarray:
        return protos[ident] + rng.normal(scale=0.9, size=(n, dim))

    g_x = np.concatenate([views(i, 4) for i in range(n_known)])
    g_y = np.repeat(np.arange(n_known), 4)
    q_x = np.concatenate([views(i, 2) for i in range(n_known)])
    q_y = np.repeat(np.arange(n_known), 2)
    u_x = np.concatenate([views(i, 3) for i in range(n_known, n_known + n_unknown)])
    u_y = np.repeat(np.arange(n_known, n_known + n_unknown), 3)

    net = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    loss_fn = ArcFaceLoss(num_classes=n_known, embedding_size=16)
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=1e-2)
    x, y = torch.tensor(g_x, dtype=torch.float32), torch.tensor(g_y)
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():

        def embed(a):
            e = net(torch.tensor(a, dtype=torch.float32))
            return torch.nn.functional.normalize(e, dim=1).numpy()

        return embed(g_x), g_y, embed(q_x), q_y, embed(u_x), u_y, float(loss)


def test_issue14_model_trained_on_the_gallery_still_calls_unknowns_new():
    G, g_y, Q, q_y, U, u_y, loss = _trained_embeddings()
    assert loss < 1.0  # it did learn the gallery
    g_ids = [f"g{n}" for n in range(len(G))]
    ident = {i: f"id{y}" for i, y in zip(g_ids, g_y, strict=True)}
    sim = G @ G.T
    pairs = pairs_from_matrix(g_ids, sim, np.array([g_ids] * len(g_ids), dtype=object))
    # the gallery's own pairs say "same" for its top candidate almost always: the shape
    # that made a pair calibration call every unknown known (BAUS 0.00)
    top_other = np.where(np.eye(len(G), dtype=bool), -np.inf, sim).argmax(axis=1)
    assert np.mean(g_y[top_other] == g_y) > 0.95

    decision = fit_decision(choose_samples(pairs, g_ids, ident))
    assert decision.separable and decision.reliable
    queries = np.concatenate([Q, U])
    true = np.concatenate([q_y, u_y])
    s = queries @ G.T
    predicted = decision.predict(s.max(axis=1), g_y[s.argmax(axis=1)], new_label=-1)
    m = open_set_metrics(true, predicted, set(g_y.tolist()), new_label=-1)
    assert m["n_unknown"] == len(U) and m["n_known"] == len(Q)
    assert m["baus"] >= 0.5, m  # unknowns still called new
    assert m["baks"] >= 0.6, m  # and known individuals still known
    real = auroc(s[: len(Q)].max(axis=1), s[len(Q) :].max(axis=1))
    assert real > 0.75

    # the seed's way, for contrast: P(same) calibrated (isotonic) on the gallery's own
    # top-10 pairs, "known" at P >= 0.5: most unknown individuals are called known
    from sklearn.isotonic import IsotonicRegression

    np.fill_diagonal(sim, -np.inf)
    top10 = np.argsort(-sim, axis=1)[:, :10]
    iso = IsotonicRegression(out_of_bounds="clip").fit(
        np.take_along_axis(sim, top10, axis=1).ravel(), (g_y[top10] == g_y[:, None]).ravel()
    )
    naive = np.where(iso.predict(s.max(axis=1)) >= 0.5, g_y[s.argmax(axis=1)], -1)
    seed_way = open_set_metrics(true, naive, set(g_y.tolist()), new_label=-1)
    assert seed_way["baus"] < m["baus"] - 0.2, (seed_way, m)
