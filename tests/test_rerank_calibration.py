"""Re-ranking calibration: scikit-learn calibrators against hand-computed values, the held-out
criterion that picks the fusion weight, the calibration-pair guarantee, the no-signal default
and the refusal to calibrate on too few negatives. Pure code, no Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from reid_ray.data import Manifest
from reid_ray.decide.calibration import Calibrator, fit_calibrator
from reid_ray.errors import ConfigError
from reid_ray.rerank import RerankConfig
from reid_ray.rerank.fusion import fit_fusion, per_query_metrics
from reid_ray.rerank.ranking import select_calibration_pairs

# -- calibrators --------------------------------------------------------------------------------


def test_isotonic_hand_computed():
    # pool adjacent violators: (0, 1, 0, 1) -> (0, .5, .5, 1); linear between, clipped outside
    cal = fit_calibrator(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 1, 0, 1]), "isotonic")
    assert cal.y == (0.0, 0.5, 0.5, 1.0)
    np.testing.assert_allclose(cal.predict(np.array([0.0, 1.5, 2.5, 9.0])), [0, 0.25, 0.5, 1])
    # ties are averaged first: x=1 twice with labels 0 and 1 -> 0.5
    tied = fit_calibrator(np.array([1.0, 1.0, 2.0]), np.array([0, 1, 1]), "isotonic")
    np.testing.assert_allclose(tied.predict(np.array([1.0, 2.0])), [0.5, 1.0])
    # log1p transform: the knots are in log1p space
    logc = fit_calibrator(np.array([0.0, np.e - 1]), np.array([0, 1]), "isotonic", "log1p")
    assert logc.x == (0.0, 1.0)


def test_isotonic_equals_scikit_learn_predict():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=300), rng.random(300) < 0.3
    ours = fit_calibrator(x, y, "isotonic")
    ref = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(x, y)
    grid = np.linspace(-4, 4, 101)
    np.testing.assert_allclose(ours.predict(grid), ref.predict(grid), atol=1e-12)
    assert np.all(np.diff(ours.predict(grid)) >= 0)


def test_logistic_hand_computed_cases():
    # labels that do not depend on the score: slope 0, intercept = log-odds of the base rate
    x = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    cal = fit_calibrator(x, y, "logistic")
    assert cal.a == pytest.approx(0.0, abs=1e-6) and cal.b == pytest.approx(0.0, abs=1e-6)
    # a constant score: the base rate 1/4 -> log(1/3)
    const = fit_calibrator(np.ones(4), np.array([0, 0, 0, 1]), "logistic")
    assert const.a == 0.0 and const.b == pytest.approx(np.log(1 / 3))
    # many pairs drawn from sigmoid(2x - 1): the fit recovers the parameters
    rng = np.random.default_rng(1)
    big = rng.normal(size=20000)
    labels = rng.random(20000) < 1 / (1 + np.exp(-(2 * big - 1)))
    fitted = fit_calibrator(big, labels, "logistic")
    assert fitted.a == pytest.approx(2.0, abs=0.1) and fitted.b == pytest.approx(-1.0, abs=0.1)
    assert Calibrator.from_dict(fitted.to_dict()) == fitted


def test_mean_average_precision_hand_computed():
    # query 0 ranks (pos, neg, pos): AP = (1/1 + 2/3) / 2; query 1 has no positive: NaN
    m = per_query_metrics(
        np.array([0, 0, 0, 1, 1]),
        np.array([3.0, 2.0, 1.0, 1.0, 2.0]),
        np.zeros(5),
        np.array([True, False, True, False, False]),
    )
    assert m["ap"][0] == pytest.approx(5 / 6) and np.isnan(m["ap"][1])
    assert m["top1"][0] == 1.0 and m["positives"].tolist() == [2, 0]
    assert m["negatives"].tolist() == [1, 2]


# -- the fusion weight --------------------------------------------------------------------------


def _trained_on_gallery(rng, n_queries=40, k=12):
    """What a model fine-tuned on the gallery gives: the global score separates same from
    different perfectly (top-1 is 1.0 at every weight), the local score is noise."""
    q = np.repeat(np.arange(n_queries), k).astype(str)
    same = np.zeros(q.size, dtype=bool)
    same[np.arange(n_queries) * k] = True
    g = np.where(same, 0.9, 0.3) + 0.05 * rng.standard_normal(q.size)
    loc = rng.uniform(0, 50, q.size)
    return q, g, loc, same


def test_no_signal_keeps_the_global_order_and_says_why():
    q, g, loc, same = _trained_on_gallery(np.random.default_rng(0))
    model = fit_fusion(g, loc, same, q, groups=q)
    assert model.weight == 0.0
    assert "no weight beats" in model.stats["weight_reason"]
    assert model.stats["cv"]["0"]["map"] == pytest.approx(1.0)
    # local scores that are all missing: weight 0 too, with its own reason
    model = fit_fusion(g, np.full(g.size, np.nan), same, q)
    assert model.weight == 0.0 and "no local scores" in model.stats["weight_reason"]
    # queries with no negatives among their pairs give no signal either
    q2 = np.repeat(["a", "b", "c", "d"], 2)
    only_same = np.array([True, True, True, True, True, True, False, False])
    model = fit_fusion(np.linspace(0, 1, 8), np.arange(8.0), only_same, q2)
    assert model.weight == 0.0 and "no signal" in model.stats["weight_reason"]


def test_informative_local_score_gets_a_weight_by_held_out_map():
    rng = np.random.default_rng(1)
    q = np.repeat(np.arange(40), 10).astype(str)
    same = np.zeros(q.size, dtype=bool)
    same[np.arange(40) * 10 + rng.integers(0, 10, 40)] = True
    g = 0.5 + 0.1 * rng.standard_normal(q.size)  # uninformative global score
    loc = np.maximum(0, 10 + 5 * rng.standard_normal(q.size) + 60 * same)
    model = fit_fusion(g, loc, same, q, groups=q)
    assert model.weight > 0 and "held-out mAP" in model.stats["weight_reason"]
    assert model.stats["cv"][f"{model.weight:g}"]["map"] > model.stats["cv"]["0"]["map"] + 0.3


def test_too_few_negatives_are_refused():
    q = np.repeat(np.arange(10), 2).astype(str)
    same = np.tile([True, False], 10)  # 10 different-individual pairs
    g, loc = np.linspace(0, 1, 20), np.arange(20.0)
    with pytest.raises(ConfigError, match="10 different-individual pairs.*min_negatives=20"):
        fit_fusion(g, loc, same, q, min_negatives=20)
    assert fit_fusion(g, loc, same, q, min_negatives=10).stats["different_pairs"] == 10
    with pytest.raises(ConfigError, match="both kinds"):
        fit_fusion(g, loc, np.ones(20, bool), q)


# -- the calibration pairs ----------------------------------------------------------------------


def _gallery(n_ids=8, per_id=4):
    ids = [f"i{k}-{j}" for k in range(n_ids) for j in range(per_id)]
    identity = [i.split("-")[0] for i in ids]
    return Manifest(
        pa.table({"image_id": ids, "path": [f"{i}.jpg" for i in ids], "identity": identity})
    )


def _loo_candidates(manifest, same_at: int, seed: int = 0):
    """Leave-one-out candidates of every gallery image against the rest: other identities
    first, the query's own identity from rank ``same_at`` (1-based) on."""
    rng = np.random.default_rng(seed)
    rows = manifest.table.to_pylist()
    out = {"query_id": [], "gallery_id": [], "score": [], "rank": []}
    for r in rows:
        same = [o["image_id"] for o in rows if o["identity"] == r["identity"] and o is not r]
        other = [o["image_id"] for o in rows if o["identity"] != r["identity"]]
        other = list(rng.permutation(other))
        order = other[: same_at - 1] + same + other[same_at - 1 :]
        for rank, g in enumerate(order, start=1):
            out["query_id"].append(r["image_id"])
            out["gallery_id"].append(g)
            out["score"].append(1.0 - rank / 100)
            out["rank"].append(rank)
    return pa.table(out)


@pytest.mark.parametrize("same_at", [1, 18])
def test_calibration_pairs_hold_the_first_same_and_negatives_at_every_rank(same_at):
    manifest = _gallery()
    cands = _loo_candidates(manifest, same_at)
    cfg = RerankConfig(calibration_top_k=3, calibration_queries=10, calibration_deep_negatives=4)
    pairs = select_calibration_pairs(cands, manifest, cfg)
    full = cands.to_pandas()
    ident = dict(
        zip(
            manifest.table["image_id"].to_pylist(),
            manifest.table["identity"].to_pylist(),
            strict=True,
        )
    )
    assert pairs["query_id"].nunique() == 10  # the seeded sample of calibration queries
    for q, got in pairs.groupby("query_id"):
        cand = full[full["query_id"] == q].sort_values("rank")
        is_same = cand["gallery_id"].map(ident) == ident[q]
        first_same = cand.loc[is_same, "gallery_id"].iloc[0]
        top_other = cand.loc[~is_same, "gallery_id"].iloc[:5].tolist()
        chosen = set(got["gallery_id"])
        assert first_same in chosen
        assert set(top_other) <= chosen  # the 5 highest-ranked other identities
        assert set(cand["gallery_id"].iloc[:3]) <= chosen  # calibration_top_k
        # deeper negatives too, down to the last rank
        deep = cand.loc[~is_same, "gallery_id"].iloc[5:]
        assert len(chosen & set(deep)) == 4 and deep.iloc[-1] in chosen
        assert got["same"].tolist() == [ident[g] == ident[q] for g in got["gallery_id"]]
    assert q not in set(pairs["gallery_id"][pairs["query_id"] == q])  # no self-pairs


def test_calibration_queries_are_drawn_from_the_held_out_images_first():
    manifest = _gallery(n_ids=10)  # 40 gallery images
    cands = _loo_candidates(manifest, same_at=1)
    held = {f"i{k}-{j}" for k in (7, 8, 9) for j in range(4)}  # 12 never trained on
    cfg = RerankConfig(calibration_queries=20)
    chosen = set(select_calibration_pairs(cands, manifest, cfg, preferred=held)["query_id"])
    assert len(chosen) == 20 and held <= chosen  # all 12, then 8 others
    few = RerankConfig(calibration_queries=5)
    chosen = set(select_calibration_pairs(cands, manifest, few, preferred=held)["query_id"])
    assert len(chosen) == 5 and chosen <= held  # a sample of the held-out ones
    again = set(select_calibration_pairs(cands, manifest, few, preferred=held)["query_id"])
    assert again == chosen  # seeded
    plain = set(select_calibration_pairs(cands, manifest, cfg)["query_id"])
    assert len(plain) == 20 and not held <= plain  # without a preference: uniform


def test_calibration_pairs_need_at_least_five_top_negatives():
    with pytest.raises(ConfigError, match="calibration_negatives must be at least 5"):
        RerankConfig(calibration_negatives=4)
