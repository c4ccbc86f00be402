"""Budgets a person can answer and samplers whose cost does not grow with N^2 (pure, no
Ray): count budgets by default, the bounded candidate pool and batched greedy of ``aas``,
the vectorised known-answer mask, round records that hold each answer once over 3+ rounds,
the one answer spelling rule, and the pseudo-labelled manifest."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pytest

from reid_ray.active.clustering import ClusterConfig, cluster_all
from reid_ray.active.config import load_al_config
from reid_ray.active.oracle import normalise_answer
from reid_ray.active.outputs import answers_so_far, write_constraints, write_pseudo_labels
from reid_ray.active.samplers import (
    DEFAULT_BUDGET,
    Known,
    _candidate_pool,
    aas_pairs,
    budget_pairs,
    disagreement,
    parse_budget,
)


def blobs(n_ids=20, per=6, dim=16, noise=0.55, seed=1):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    x = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(n_ids * per, dim))
    return x.astype(np.float32), np.repeat(np.arange(n_ids), per)


@pytest.fixture(scope="module")
def ambiguous():
    x, y = blobs()
    return x, y, cluster_all(x, ClusterConfig(k=10, k1=10, k2=3))


def test_the_default_budget_is_a_number_of_pairs_and_the_paper_fraction_stays():
    assert DEFAULT_BUDGET == 1000 and parse_budget("1000") == 1000
    cfg = load_al_config({"manifest": "m.csv", "out": "o"})
    assert budget_pairs(cfg.budget_value(), 140_000) == 1000  # not 0.033% of 9.8e9 pairs
    assert budget_pairs(parse_budget("0.033%"), 1000) == round(0.00033 * 1000 * 999 / 2)


def test_known_mask_matches_the_pair_by_pair_rule(ambiguous):
    x, _, _ = ambiguous
    rng = np.random.default_rng(0)
    n = len(x)
    must = [tuple(rng.choice(n, 2, replace=False)) for _ in range(30)]
    cannot = [tuple(rng.choice(n, 2, replace=False)) for _ in range(30)]
    asked = [tuple(rng.choice(n, 2, replace=False)) for _ in range(30)]
    known = Known(n, must, cannot, asked)
    a, b = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    a, b = np.concatenate([a, [p for p, _ in asked]]), np.concatenate([b, [q for _, q in asked]])
    expected = [known.implied(int(p), int(q)) for p, q in zip(a, b, strict=True)]
    assert known.implied_mask(a, b).tolist() == expected and any(expected)


def test_candidate_pool_takes_every_region_best():
    score = np.array([0.9, 0.1, 0.8, 0.2, 0.05, 0.7, 0.3])
    region = np.array([0, 0, 1, 1, 2, 2, 3])
    # the 2 best overall (0, 2) and each region's best (0, 2, 5, 6); sorted rows
    assert _candidate_pool(score, region, 2).tolist() == [0, 2, 5, 6]
    assert _candidate_pool(score, region, 10).tolist() == list(range(7))  # small: all


@pytest.mark.parametrize("max_steps", [1, 3, 1000])
def test_bounded_batched_aas_returns_new_disputed_pairs_spread_over_regions(ambiguous, max_steps):
    x, _, cl = ambiguous
    a, b, _, votes = disagreement(cl)
    vote_of = dict(zip(zip(a.tolist(), b.tolist(), strict=True), votes.tolist(), strict=True))
    exact = aas_pairs(x, cl, 24, Known(len(x)))
    pairs = aas_pairs(x, cl, 24, Known(len(x)), min_pool=40, pool_factor=2, max_steps=max_steps)
    assert len(pairs) == 24 == len(set(pairs)) and all(p < q for p, q in pairs)
    assert all(0 < vote_of[p] < 1 for p in pairs)
    assert len({i for p in pairs for i in p}) >= 24  # spread, not one corner
    if max_steps == 1000:  # no batches: the greedy over the pool
        assert pairs[0] == exact[0]
    again = aas_pairs(x, cl, 24, Known(len(x), asked=pairs), min_pool=40, max_steps=max_steps)
    assert not set(again) & set(pairs)


def test_round_records_hold_each_answer_once_over_four_rounds():
    # three records as they are written now (each round its own answers) and one written by
    # an older version (every earlier answer repeated): each pair comes back once, in order
    records = [
        {"round": 0, "must": [["a", "b"]], "cannot": [["a", "c"]], "asked": [["a", "b"], ["a", "c"], ["d", "e"]]},
        {"round": 1, "must": [["c", "d"]], "cannot": [], "asked": [["c", "d"]]},
        {"round": 2, "must": [["a", "b"], ["c", "d"], ["f", "g"]], "cannot": [["a", "c"]],
         "asked": [["a", "b"], ["a", "c"], ["d", "e"], ["c", "d"], ["f", "g"]]},
        {"round": 3, "must": [], "cannot": [["g", "h"]], "asked": [["h", "g"]]},
    ]  # fmt: skip
    must, cannot, asked = answers_so_far(records)
    assert must == [["a", "b"], ["c", "d"], ["f", "g"]]
    assert cannot == [["a", "c"], ["g", "h"]]
    assert asked == [["a", "b"], ["a", "c"], ["d", "e"], ["c", "d"], ["f", "g"], ["h", "g"]]


def test_constraints_file_lists_each_answer_once(tmp_path):
    records = [
        {"round": 0, "must": [["a", "b"]], "cannot": [["a", "c"]], "asked": [["a", "b"], ["a", "c"], ["d", "e"]]},
        {"round": 1, "must": [["c", "d"]], "cannot": [], "asked": [["c", "d"]]},
        {"round": 2, "must": [], "cannot": [["e", "f"]], "asked": [["e", "f"]]},
    ]  # fmt: skip
    path = str(tmp_path / "constraints.csv")
    assert write_constraints(path, records) == 5
    rows = list(csv.DictReader(open(path)))
    assert [(r["image_id_a"], r["image_id_b"], r["answer"], r["round"]) for r in rows] == [
        ("a", "b", "same", "0"), ("a", "c", "different", "0"), ("d", "e", "unsure", "0"),
        ("c", "d", "same", "1"), ("e", "f", "different", "2"),
    ]  # fmt: skip


def test_one_spelling_rule_for_page_and_reader():
    for raw, want in (("Same", "same"), (" DIFFERENT ", "different"), ("u", "unsure"),
                      ("k", "skip"), ("Skip", "skip"), ("maybe", None), (None, None)):  # fmt: skip
        assert normalise_answer(raw) == want


def test_pseudo_labelled_manifest_names_every_image(tmp_path):
    ids = np.array([f"im{i}" for i in range(6)])
    table = pa.table({
        "image_id": ids.tolist(), "path": [f"/x/{i}.jpg" for i in ids],
        "bbox": pa.array([[0, 0, 4, 4]] * 6, pa.list_(pa.float32(), 4)),
        "species": ["fox"] * 6, "viewpoint": [None] * 6, "date": [None] * 6,
    })  # fmt: skip
    labels = np.array([0, 0, 1, -1, 0, -1])
    path = str(tmp_path / "pseudo_labels.csv")
    counts = write_pseudo_labels(path, table, ids, labels, 2, {"im0": 2})
    rows = list(csv.DictReader(open(path)))
    assert [r["identity"] for r in rows] == ["p0", "p0", "p1", "s0", "p0", "s1"]
    assert [r["split"] for r in rows] == ["train", "train", "", "", "train", ""]
    assert rows[0]["answers"] == "2" and rows[0]["bbox"] == "[0, 0, 4, 4]"
    assert rows[0]["species"] == "fox" and "viewpoint" not in rows[0]
    assert counts == {"images": 6, "identities": 4, "in_clusters": 4, "trainable": 3}
