"""Pure parts of the gallery: its decision fit, grouping, folding, reviewed CSVs."""

from __future__ import annotations

import numpy as np
import pytest

from reid_ray.decide import KNOWN, NEW, confidence_from_record, known_or_new
from reid_ray.errors import ConfigError
from reid_ray.gallery.build import fit_gallery_decision as fit_calibration
from reid_ray.gallery.provisional import evaluate_decisions, group_new
from reid_ray.gallery.searcher import fold_identities


def test_decision_and_a_confidence_stored_by_an_older_gallery():
    d = known_or_new(np.array([0.9, 0.5, np.nan]), 0.7)
    assert d.tolist() == [KNOWN, NEW, NEW]
    cal = {"logistic": {"a": 10.0, "b": -7.0}}  # galleries built before reid_ray.decide
    p = confidence_from_record(cal).predict(np.array([0.9, 0.7, 0.5]))
    assert p[0] > 0.5 and p[1] == pytest.approx(0.5) and p[2] < 0.5


def probability(scores, calibration):
    return confidence_from_record(calibration).predict(scores)


def _blobs(n_ids: int, per: int, dim: int = 16, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    x = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(n_ids * per, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.asarray([f"img{i:03d}" for i in range(len(x))], dtype=object)
    identities = np.asarray([f"id{i // per}" for i in range(len(x))], dtype=object)
    return ids, identities, x.astype(np.float32)


def test_fit_calibration_separates_well_separated_identities():
    from reid_ray.index import build_index

    ids, identities, x = _blobs(6, 4)
    cal = fit_calibration(ids, identities, x, build_index(x, ids), k=10)
    assert cal["simulated"]["baks"] == pytest.approx(1.0)
    assert cal["simulated"]["baus"] == pytest.approx(1.0)
    assert cal["separable"] and cal["n_known"] == len(ids)
    same = x[0] @ x[1]
    other = max(x[0] @ x[j] for j in range(4, len(x)))
    assert other < cal["threshold"] <= same
    assert probability(np.array([same]), cal)[0] > 0.5 > probability(np.array([other]), cal)[0]


def test_fit_calibration_simulates_with_the_images_the_model_never_trained_on():
    """A fine-tuned model packs its training identities tight; the held-out ones look like
    real queries. With a checkpoint's held-out ids the threshold comes from those."""
    from reid_ray.index import build_index

    ids, identities, x = _blobs(10, 4, noise=0.01)
    _, _, loose = _blobs(10, 4, noise=0.6, seed=1)
    held = np.isin(identities, [f"id{i}" for i in range(5, 10)])
    x[held] = loose[held]
    index = build_index(x, ids)
    cal = fit_calibration(ids, identities, x, index, k=10, max_queries=20,
                          heldout_ids=set(ids[held]))  # fmt: skip
    assert cal["n_known"] == 20 and cal["info"]["heldout"]  # the 20 held-out images only
    assert cal["fitted_on"].startswith("held-out images")
    plain = fit_calibration(ids, identities, x, index, k=10)
    assert not plain["info"]["heldout"] and plain["n_known"] == 40
    assert cal["auroc"] < plain["auroc"]  # the training images' view is optimistic


def test_fit_calibration_refuses_a_gallery_of_single_images():
    from reid_ray.index import build_index

    ids, identities, x = _blobs(5, 1)
    with pytest.raises(ConfigError, match="at least two images"):
        fit_calibration(ids, identities, x, build_index(x, ids), k=4)


def test_group_new_groups_mutual_neighbours_only():
    ids, _, x = _blobs(3, 3, seed=1)
    labels = group_new(ids, x, threshold=0.9, mutual_k=2, night="n1")
    assert len(set(labels)) == 3
    assert labels[0] == labels[1] == labels[2] == "new-n1-0001"
    assert labels[3] == labels[4] == labels[5] != labels[0]
    # deterministic, whatever the order of the rows
    order = np.random.default_rng(0).permutation(len(ids))
    shuffled = group_new(ids[order], x[order], 0.9, 2, "n1")
    assert dict(zip(ids[order], shuffled, strict=True)) == dict(zip(ids, labels, strict=True))
    # a threshold above every similarity: one individual per image
    assert len(set(group_new(ids, x, 1.01, 2, "n1"))) == len(ids)
    assert group_new([], np.zeros((0, 4), np.float32), 0.5, 2, "n1") == []


def test_fold_identities_keeps_best_image_per_identity():
    lookup = {"a1": "A", "a2": "A", "b1": "B", "c1": "C"}
    scores = np.array([0.9, 0.8, 0.7, 0.6, -np.inf], dtype=np.float32)
    images = np.array(["a1", "a2", "b1", "c1", None], dtype=object)
    ids, s, imgs = fold_identities(scores, images, lookup, 2)
    assert ids == ["A", "B"] and imgs == ["a1", "b1"]
    assert s == pytest.approx([0.9, 0.7])


def test_evaluate_decisions_counts():
    ev = evaluate_decisions(
        ["A", "B", "X", "X", "Y", None],
        {"A", "B"},
        [KNOWN, NEW, NEW, NEW, NEW, KNOWN],
        ["A", "new-1", "new-2", "new-2", "new-3", "A"],
        [None, "new-1", "new-2", "new-2", "new-3", None],
    )
    assert ev["n_labelled"] == 5
    assert ev["decision_accuracy"] == pytest.approx(4 / 5)
    assert ev["known_identified"] == 0.5 and ev["new_detected"] == 1.0
    assert ev["new_grouping_pair_precision"] == 1.0 and ev["new_grouping_pair_recall"] == 1.0


def test_read_reviewed_rows_and_reasons(tmp_path):
    from reid_ray.gallery.merge import read_reviewed

    csv = tmp_path / "review.csv"
    csv.write_text(
        "image_id,decision,identity,accept\n"
        "a,known,A,yes\n"
        "b,new,new-n1-0001,no\n"
        "c,new,,yes\n"
        "zz,known,A,yes\n"
        "d,new,B,maybe\n"
        "e,new,CORRECTED,YES\n"
    )
    accepted, errors = read_reviewed(str(csv), {"a", "b", "c", "d", "e"})
    assert accepted == {"a": "A", "e": "CORRECTED"}
    reasons = {e["image_id"]: e["reason"] for e in errors}
    assert set(reasons) == {"c", "zz", "d"}
    assert "identity" in reasons["c"] and "results" in reasons["zz"] and "yes or no" in reasons["d"]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,who\n1,2\n")
    with pytest.raises(ConfigError, match="lacks column"):
        read_reviewed(str(bad), set())


def test_nightly_config_rejects_unknown_keys():
    from reid_ray.gallery import load_nightly_config

    cfg = load_nightly_config({"search": {"k": 10}}, ["group.mutual_k=3"])
    assert cfg.search.k == 10 and cfg.group.mutual_k == 3
    with pytest.raises(ConfigError, match="unknown setting"):
        load_nightly_config({"serach": {"k": 10}})
    with pytest.raises(ConfigError, match="search.k"):
        load_nightly_config({"search": {"k": 0}})


def _calibration_pairs(n_queries: int, seed: int = 0):
    """Scored calibration pairs as ``rerank_candidates`` returns them: per query one same
    pair (high probability for most queries) and five other-identity pairs (low)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        p_same = rng.uniform(0.6, 0.95) if q % 5 else rng.uniform(0.0, 0.2)  # 1 in 5 missed
        rows.append((f"q{q}", f"g{q}-same", 1, p_same, True))
        for j in range(5):
            rows.append((f"q{q}", f"g{q}-{j}", j + 2, rng.uniform(0.05, 0.4), False))
    q, g, rank, p, same = zip(*rows, strict=True)
    table = pa.table(
        {
            "query_id": list(q),
            "gallery_id": list(g),
            "rank": pa.array(rank, pa.int32()),
            "global_score": list(p),
            "local_score": list(p),
            "fused_score": list(p),
            "probability": list(p),
            "same": list(same),
        }
    )
    identity_of = {f"q{i}": f"id{i // 2}" for i in range(n_queries)}
    identity_of.update({f"g{i}-same": f"id{i // 2}" for i in range(n_queries)})
    identity_of.update({f"g{i}-{j}": f"other{i}-{j}" for i in range(n_queries) for j in range(5)})
    return table, identity_of


def test_rerank_decision_is_fitted_on_simulated_known_and_absent_queries():
    from reid_ray.gallery.reranking import decision_record

    table, identity_of = _calibration_pairs(40)
    decision = decision_record(table, sorted(identity_of), identity_of, seed=0)
    # known samples: the top pair (same for 4 in 5 queries); absent: the best other pair
    assert decision["n_known"] == decision["n_unknown"] == 40
    assert 0.4 < decision["threshold"] <= 0.6  # between the best negatives and the right tops
    assert decision["threshold_source"].startswith("simulated open set")
    assert decision["simulated"]["baus"] == pytest.approx(1.0)
    # global and fused scores are equal here: a tie keeps the global score
    assert decision["gate"] == "global" and set(decision["info"]["gates"]) == {"global", "fused"}


def test_rerank_decision_uses_the_held_out_queries_when_enough():
    from reid_ray.gallery.reranking import decision_record

    table, identity_of = _calibration_pairs(40)
    held = {f"q{i}" for i in range(12)}  # 6 individuals: enough (5)
    decision = decision_record(table, sorted(identity_of), identity_of, 0, held)
    assert decision["n_known"] == decision["n_unknown"] == 12
    assert "held-out images" in decision["fitted_on"]
    few = {f"q{i}" for i in range(8)}  # 4 individuals: all queries, as without held-out ids
    decision = decision_record(table, sorted(identity_of), identity_of, 0, few)
    assert decision["n_known"] == 40 and "held-out images:" not in decision["fitted_on"]


def test_rerank_decision_without_other_identities_or_samples():
    from reid_ray.gallery.reranking import decision_record

    table, identity_of = _calibration_pairs(10)
    only_same = table.filter(table["same"])
    # no other identity listed: the unknown role gets the lowest listed score (an upper
    # bound), so known and unknown look alike and the record says the decision is chance
    decision = decision_record(only_same, sorted(identity_of), identity_of, seed=0)
    assert decision["n_unknown"] == 10 and not decision["separable"]
    assert decision["auroc"] == pytest.approx(0.5)
    # nothing to simulate at all: 0.5 on the fused probability, and the record says why
    decision = decision_record(table.slice(0, 0), sorted(identity_of), identity_of, seed=0)
    assert decision["threshold"] == 0.5 and decision["threshold_source"].startswith("0.5")
    assert decision["gate"] == "fused"
