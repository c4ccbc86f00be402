"""Evaluation metrics against hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from reid_ray.errors import ConfigError
from reid_ray.evaluation.metrics import (
    cluster_metrics,
    open_set_metrics,
    retrieval_metrics,
    retrieval_metrics_from_similarity,
)

# --------------------------------------------------------------------------- retrieval

# Query "A" (2 relevant): ranked B A C A -> hits at ranks 2 and 4.
#   AP = (1/2 + 2/4) / 2 = 0.5; first hit at rank 2.
# Query "B" (3 relevant, list truncated): ranked B C C C -> one hit at rank 1.
#   AP = (1/1) / 3 = 1/3 (the two relevant items beyond the list count as missed); rank 1.
# Query "C" (1 relevant): ranked A A B B -> no hit. AP = 0; never found.
# Query "D" (0 relevant): excluded (an open-set query).
# top1 = 1/3 (B), top2 = 2/3 (A, B), top5 = 2/3; mAP = (0.5 + 1/3 + 0) / 3 = 5/18.
QUERIES = ["A", "B", "C", "D"]
RANKED = [["B", "A", "C", "A"], ["B", "C", "C", "C"], ["A", "A", "B", "B"], ["A", "B", "C", "A"]]
N_RELEVANT = [2, 3, 1, 0]


def test_retrieval_hand_computed():
    m = retrieval_metrics(QUERIES, np.array(RANKED, dtype=object), N_RELEVANT, ks=(1, 2, 5))
    assert m["n_queries"] == 3
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top2"] == pytest.approx(2 / 3)
    assert m["top5"] == pytest.approx(2 / 3)
    assert m["mAP"] == pytest.approx(5 / 18)


def test_retrieval_ragged_lists_with_padding_same_as_array():
    # Query A's list cut after its first hit, padded with None; Query C's list is empty.
    ranked = [["B", "A"], ["B", None, None], [], ["A"]]
    m = retrieval_metrics(QUERIES, ranked, N_RELEVANT, ks=(1, 2))
    # A: AP = (1/2) / 2 = 0.25; B: 1/3; C: 0 -> mAP = (0.25 + 1/3) / 3 = 7/36
    assert m["mAP"] == pytest.approx(7 / 36)
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top2"] == pytest.approx(2 / 3)


def test_retrieval_default_keys_and_late_hit():
    # first hit at rank 6: outside top5, inside top20; AP = (1/6) / 1
    ranked = [["x"] * 5 + ["q"] + ["x"] * 20]
    m = retrieval_metrics(["q"], ranked, [1])
    assert set(m) == {"top1", "top5", "top20", "mAP", "n_queries"}
    assert (m["top1"], m["top5"], m["top20"]) == (0.0, 0.0, 1.0)
    assert m["mAP"] == pytest.approx(1 / 6)


def test_retrieval_integer_identities():
    m = retrieval_metrics(np.array([1, 2]), np.array([[2, 1], [2, 1]]), [1, 1], ks=(1,))
    assert m["top1"] == 0.5
    assert m["mAP"] == pytest.approx((0.5 + 1.0) / 2)


def test_retrieval_empty_and_all_open_set():
    m = retrieval_metrics([], [], [], ks=(1, 5))
    assert m["n_queries"] == 0 and math.isnan(m["mAP"]) and math.isnan(m["top1"])
    m = retrieval_metrics(["z"], [["a", "b"]], [0])
    assert m["n_queries"] == 0 and math.isnan(m["top5"])


def test_retrieval_validates_shapes():
    with pytest.raises(ConfigError, match="rows"):
        retrieval_metrics(["a", "b"], [["a"]], [1, 1])
    with pytest.raises(ConfigError, match="n_relevant"):
        retrieval_metrics(["a"], [["a"]], [1, 1])
    with pytest.raises(ConfigError, match="n_relevant=1"):
        retrieval_metrics(["a"], [["a", "a"]], [1])  # more hits than relevant items
    with pytest.raises(ConfigError, match="ks"):
        retrieval_metrics(["a"], [["a"]], [1], ks=(0,))


def test_retrieval_from_similarity_hand_computed():
    gallery = ["a", "b", "a", "c"]
    sim = np.array(
        [
            [0.9, 0.8, 0.1, 0.5],  # a: ranked a b c a -> hits 1, 4: AP = (1 + 2/4) / 2 = 0.75
            [0.1, 0.2, 0.3, 0.9],  # c: ranked c ... -> AP = 1
            [0.5, 0.5, 0.5, 0.5],  # d: not in the gallery: excluded
        ]
    )
    m = retrieval_metrics_from_similarity(sim, ["a", "c", "d"], gallery, ks=(1,))
    assert m["n_queries"] == 2
    assert m["top1"] == 1.0
    assert m["mAP"] == pytest.approx((0.75 + 1.0) / 2)
    with pytest.raises(ConfigError, match="shape"):
        retrieval_metrics_from_similarity(sim[:, :3], ["a", "c", "d"], gallery)


def test_retrieval_from_similarity_matches_sklearn_average_precision():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    gallery = rng.integers(0, 6, size=40)
    queries = rng.integers(0, 6, size=15)
    sim = rng.random((15, 40))
    m = retrieval_metrics_from_similarity(sim, queries, gallery, ks=(1,))
    aps = [average_precision_score(gallery == q, s) for q, s in zip(queries, sim, strict=True)]
    assert m["mAP"] == pytest.approx(np.mean(aps))
    assert m["top1"] == pytest.approx(np.mean(gallery[sim.argmax(axis=1)] == queries))


# --------------------------------------------------------------------------- open set


def test_open_set_hand_computed():
    known = {"a", "b"}
    true = ["a", "a", "a", "b", "b", "x", "x", "y"]
    pred = ["a", "a", "new", "b", "a", "new", "a", "new"]
    m = open_set_metrics(true, pred, known)
    # BAKS: a 2/3, b 1/2 -> (2/3 + 1/2) / 2 = 7/12 (plain accuracy would be 3/5)
    assert m["baks"] == pytest.approx(7 / 12)
    # BAUS: x 1/2, y 1/1 -> 3/4 (plain accuracy would be 2/3)
    assert m["baus"] == pytest.approx(3 / 4)
    assert (m["n_known"], m["n_unknown"]) == (5, 3)


def test_open_set_no_unknown_or_empty_is_nan_and_custom_label():
    m = open_set_metrics([1, 2], [1, -1], known_identities=[1, 2], new_label=-1)
    assert m["baks"] == pytest.approx(0.5) and math.isnan(m["baus"])
    m = open_set_metrics([], [], known_identities=[])
    assert math.isnan(m["baks"]) and math.isnan(m["baus"]) and m["n_known"] == 0
    with pytest.raises(ConfigError, match="length"):
        open_set_metrics(["a"], ["a", "b"], ["a"])


# --------------------------------------------------------------------------- clustering


def test_cluster_metrics_perfect_up_to_renaming():
    m = cluster_metrics(["a", "a", "b", "b", "c"], [7, 7, 3, 3, 9])
    for key in ("nmi", "ari", "pairwise_precision", "pairwise_recall", "pairwise_f1"):
        assert m[key] == pytest.approx(1.0)
    assert m["n_clusters"] == 3


def test_cluster_metrics_hand_computed():
    true = [0, 0, 0, 1, 1, 2]
    pred = ["x", "x", "y", "y", "y", "z"]
    # contingency: 0 -> x2 y1; 1 -> y2; 2 -> z1. Pairs together in both: C(2,2) + C(2,2) = 2.
    # predicted pairs: x C(2,2) + y C(3,2) = 4; true pairs: C(3,2) + C(2,2) = 4.
    # precision = recall = f1 = 2/4. ARI = (2 - 4*4/15) / ((4+4)/2 - 4*4/15) = 14/44.
    m = cluster_metrics(true, pred)
    assert m["pairwise_precision"] == pytest.approx(0.5)
    assert m["pairwise_recall"] == pytest.approx(0.5)
    assert m["pairwise_f1"] == pytest.approx(0.5)
    assert m["ari"] == pytest.approx(14 / 44)
    assert m["n_clusters"] == 3
    assert 0.0 < m["nmi"] < 1.0


def test_cluster_pairwise_matches_brute_force():
    rng = np.random.default_rng(3)
    true = rng.integers(0, 5, 40)
    pred = rng.integers(0, 7, 40)
    same_t = same_p = both = 0
    for i, j in itertools.combinations(range(40), 2):
        t, p = true[i] == true[j], pred[i] == pred[j]
        same_t += t
        same_p += p
        both += t and p
    m = cluster_metrics(true, pred)
    assert m["pairwise_precision"] == pytest.approx(both / same_p)
    assert m["pairwise_recall"] == pytest.approx(both / same_t)


def test_cluster_singletons_noise_and_empty():
    m = cluster_metrics(["a", "a", "b"], [1, 2, 3])  # no predicted pair
    assert m["pairwise_precision"] == 1.0 and m["pairwise_recall"] == 0.0
    assert m["pairwise_f1"] == 0.0
    # noise points (-1) are singletons, not one big cluster
    m = cluster_metrics(["a", "a", "b", "b"], [0, 0, -1, -1], noise_label=-1)
    assert m["n_clusters"] == 3
    assert m["pairwise_precision"] == 1.0 and m["pairwise_recall"] == pytest.approx(0.5)
    m = cluster_metrics([], [])
    assert m["n_clusters"] == 0 and math.isnan(m["nmi"]) and math.isnan(m["pairwise_f1"])
    with pytest.raises(ConfigError, match="length"):
        cluster_metrics([1, 2], [1])
    with pytest.raises(ConfigError, match="null"):
        cluster_metrics(["a", None], [1, 1])
