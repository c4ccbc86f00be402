"""Active learning, pure parts (no Ray): k-NN graph, clusterings, samplers, budgets,
constraint refinement."""

from __future__ import annotations

import numpy as np
import pytest

from reid_ray.active.clustering import (
    NOISE,
    ClusterConfig,
    cluster_all,
    dbscan_jaccard,
    finch,
    first_neighbour_partition,
    kmeans,
    relabel,
    usl_pseudo_labels,
)
from reid_ray.active.config import load_al_config
from reid_ray.active.constraints import MERGE_POLICIES, UnionFind, find_contradictions, refine
from reid_ray.active.graph import jaccard_distance, knn_graph
from reid_ray.active.samplers import (
    Known,
    budget_pairs,
    disagreement,
    parse_budget,
    sample_pairs,
    split_budget,
    threshold,
)
from reid_ray.errors import ConfigError, ReidRayError
from reid_ray.evaluation.metrics import cluster_metrics


def blobs(n_ids=12, per=6, dim=16, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    x = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(n_ids * per, dim))
    return x.astype(np.float32), np.repeat(np.arange(n_ids), per)


def test_knn_graph_excludes_self_and_matches_brute_force():
    x, _ = blobs()
    g = knn_graph(x, 5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    expected = np.argsort(-sim, axis=1)[:, :5]
    assert g.idx.shape == (len(x), 5)
    assert not (g.idx == np.arange(len(x))[:, None]).any()
    np.testing.assert_allclose(g.sim, np.take_along_axis(sim, expected, 1), atol=1e-5)
    a, b, s = g.edges()
    assert (a < b).all() and len(set(zip(a.tolist(), b.tolist(), strict=True))) == len(a)


def test_jaccard_distance_is_sparse_symmetric_and_small_within_identities():
    x, y = blobs()
    d = jaccard_distance(knn_graph(x, 10), k1=10, k2=3)
    assert d.shape == (len(x), len(x))
    assert d.nnz < len(x) ** 2  # never dense
    dense = d.toarray()
    np.testing.assert_allclose(dense, dense.T, atol=1e-6)
    same = (y[:, None] == y[None, :]) & (dense > 0)
    other = (y[:, None] != y[None, :]) & (dense > 0)
    assert dense[same].mean() < (dense[other].mean() if other.any() else 1.0)


def test_clusterings_recover_well_separated_identities():
    x, y = blobs(noise=0.2)
    cfg = ClusterConfig(k=10, k1=6, k2=3, eps=0.6, min_samples=3)
    cl = cluster_all(x, cfg)
    assert cluster_metrics(y, cl.dbscan, noise_label=NOISE)["ari"] > 0.95
    assert cluster_metrics(y, cl.kmeans)["nmi"] > 0.8
    assert cluster_metrics(y, cl.finch)["nmi"] > 0.8
    np.testing.assert_array_equal(usl_pseudo_labels(x, cfg), cl.dbscan)


def test_dbscan_leaves_isolated_points_as_noise():
    x, _ = blobs(n_ids=4, per=10, noise=0.1)
    far = -np.abs(np.random.default_rng(5).normal(size=(2, 16))).astype(np.float32)  # loners
    labels = dbscan_jaccard(
        knn_graph(np.vstack([x, far]), 8), ClusterConfig(k1=8, k2=3, min_samples=3)
    )
    assert (labels[-2:] == NOISE).all() and (labels[:-2] != NOISE).all()


def test_first_neighbour_partition_by_hand_and_finch_levels():
    # 0<->1, 2->1, 3<->4 : two clusters
    np.testing.assert_array_equal(
        relabel(first_neighbour_partition(np.array([1, 0, 1, 4, 3]))), [0, 0, 0, 1, 1]
    )
    x, y = blobs(n_ids=6, per=5, noise=0.1)
    chosen, levels = finch(x, target=6)
    counts = [int(lv.max()) + 1 for lv in levels]
    assert counts == sorted(counts, reverse=True)  # each level coarser
    assert cluster_metrics(y, chosen)["ari"] > 0.8


def test_kmeans_is_seeded_and_covers_everything():
    x, _ = blobs()
    a, b = kmeans(x, 12, seed=3), kmeans(x, 12, seed=3)
    np.testing.assert_array_equal(a, b)
    assert (a >= 0).all() and a.max() < 12


def test_relabel_keeps_noise_and_is_consecutive():
    np.testing.assert_array_equal(relabel(np.array([7, -1, 7, 3, -1, 9])), [0, -1, 0, 1, -1, 2])


# budgets


def test_budgets_parse_and_split():
    assert parse_budget("0.033%") == pytest.approx(0.00033)
    assert parse_budget(0.00033) == pytest.approx(0.00033)
    assert parse_budget("200") == 200
    for bad in ("abc", "-1", "150%", "2.5"):
        with pytest.raises(ConfigError):
            parse_budget(bad)
    assert budget_pairs(0.00033, 1000) == round(0.00033 * 1000 * 999 / 2)
    assert budget_pairs(1e-9, 10) == 1 and budget_pairs(0.0, 10) == 0 and budget_pairs(7, 10) == 7
    assert split_budget(10, 3) == [4, 3, 3] and sum(split_budget(165, 2)) == 165
    with pytest.raises(ConfigError):
        split_budget(5, 0)


# samplers


@pytest.fixture(scope="module")
def ambiguous():
    x, y = blobs(n_ids=15, per=6, noise=0.55, seed=1)
    cl = cluster_all(x, ClusterConfig(k=10, k1=10, k2=3))
    return x, y, cl


@pytest.mark.parametrize("name", ["random", "random_knn", "margin", "aas"])
def test_samplers_return_new_distinct_pairs(ambiguous, name):
    x, _, cl = ambiguous
    pairs = sample_pairs(name, x, cl, 15, known=Known(len(x)), seed=0)
    assert len(pairs) == 15
    assert all(a < b for a, b in pairs) and len(set(pairs)) == 15
    again = sample_pairs(name, x, cl, 15, known=Known(len(x), asked=pairs), seed=0)
    assert not set(again) & set(pairs)
    assert sample_pairs("usl", x, cl, 15, known=Known(len(x))) == []


def test_samplers_skip_pairs_whose_answer_is_implied(ambiguous):
    x, _, cl = ambiguous
    a, b, _ = cl.graph.edges()
    must = [(int(a[0]), int(b[0]))]
    known = Known(len(x), must=must, cannot=[(int(a[1]), int(b[1]))])
    for name in ("random", "random_knn", "margin", "aas"):
        pairs = sample_pairs(name, x, cl, 30, known=known)
        assert not any(known.implied(p, q) for p, q in pairs)
    # must-links joining two thirds of the items imply the answer of about half of all pairs
    chain = [(i, i + 1) for i in range(len(x) * 2 // 3 - 1)]
    known = Known(len(x), must=chain)
    for name in ("random", "random_knn", "margin", "aas"):
        pairs = sample_pairs(name, x, cl, 30, known=known)
        assert len(pairs) == 30 and not any(known.implied(p, q) for p, q in pairs)


def test_random_knn_draws_from_the_candidate_pairs_and_random_from_every_pair(ambiguous):
    x, _, cl = ambiguous
    a, b, _ = cl.graph.edges()
    edges = set(zip(a.tolist(), b.tolist(), strict=True))
    knn = sample_pairs("random_knn", x, cl, 40, known=Known(len(x)), seed=3)
    assert set(knn) <= edges
    assert knn != sample_pairs("random_knn", x, cl, 40, known=Known(len(x)), seed=4)
    anywhere = sample_pairs("random", x, cl, 200, known=Known(len(x)), seed=3)
    assert set(anywhere) - edges  # most of all pairs are not k-NN edges
    every = sample_pairs("random_knn", x, cl, len(edges) + 5, known=Known(len(x)))
    assert sorted(every) == sorted(edges)  # the candidates run out: each asked once


def test_margin_picks_pairs_nearest_the_threshold(ambiguous):
    x, _, cl = ambiguous
    a, b, s = cl.graph.edges()
    tau = threshold(cl.graph, cl.dbscan)
    pairs = sample_pairs("margin", x, cl, 5, known=Known(len(x)))
    sim = dict(zip(zip(a.tolist(), b.tolist(), strict=True), s.tolist(), strict=True))
    picked = np.array([abs(sim[p] - tau) for p in pairs])
    assert picked.max() <= np.sort(np.abs(s - tau))[4] + 1e-6


def test_aas_targets_disagreements_and_spreads_over_regions(ambiguous):
    x, _, cl = ambiguous
    a, b, _, votes = disagreement(cl)
    vote_of = dict(zip(zip(a.tolist(), b.tolist(), strict=True), votes.tolist(), strict=True))
    pairs = sample_pairs("aas", x, cl, 10, known=Known(len(x)))
    disputed = [p for p in pairs if 0 < vote_of[p] < 1]
    assert len(disputed) == len(pairs)
    # representative: not all in one place (more distinct items than a single corner gives)
    assert len({i for p in pairs for i in p}) >= 15


def test_unknown_sampler_is_refused(ambiguous):
    x, _, cl = ambiguous
    with pytest.raises(ConfigError, match="sampler"):
        sample_pairs("entropy", x, cl, 3, known=Known(len(x)))


# refinement


def test_union_find_transitive_closure():
    uf = UnionFind(5)
    uf.union(0, 1)
    uf.union(1, 2)
    assert uf.find(0) == uf.find(2) != uf.find(3)


def test_whole_cluster_merge_closes_must_links_transitively_including_noise():
    labels = np.array([0, 0, 1, 1, 2, 2, -1, -1])
    r = refine(labels, must=[(1, 2), (3, 4), (6, 0)], cannot=[], merge="clusters")
    assert len(set(r.labels[:7].tolist())) == 1  # 0=1=2=3=4=5 by closure, noise 6 joins
    assert r.labels[7] == NOISE
    assert r.must_satisfied == 3 and r.n_merges == 3 and not r.contradictions


def test_item_merge_moves_only_the_answered_items_into_the_larger_cluster():
    labels = np.array([0, 0, 0, 1, 1, -1, -1])
    r = refine(labels, must=[(1, 3), (3, 5)], cannot=[], merge="items")
    # the group {1, 3, 5} gathers in cluster 0 (the largest it touches); 4 stays in its own
    assert r.labels[1] == r.labels[3] == r.labels[5] == r.labels[0] == r.labels[2]
    assert r.labels[4] != r.labels[0] and r.labels[4] != NOISE
    assert r.labels[6] == NOISE and r.n_moved == 2 and r.n_merges == 0


def test_mutual_merge_joins_whole_clusters_only_when_each_is_the_others_nearest():
    # clusters 0 and 1 face each other; cluster 2 is far, and its nearest is cluster 1,
    # but cluster 1's nearest is 0: a must-link 1~2 moves items, a must-link 0~1 merges whole
    feats = np.array(
        [[1, 0, 0], [1, 0.1, 0], [0.8, 0.6, 0], [0.8, 0.7, 0], [0, 0.3, 1], [0, 0.35, 1]],
        np.float32,
    )
    labels = np.array([0, 0, 1, 1, 2, 2])
    r = refine(labels, must=[(0, 2), (3, 4)], cannot=[], features=feats, merge="mutual")
    assert r.labels[0] == r.labels[1] == r.labels[2] == r.labels[3] == r.labels[4]
    assert r.labels[5] != r.labels[0]  # the rest of the far cluster stayed
    assert r.n_merges == 1 and r.n_moved == 1
    with pytest.raises(ReidRayError, match="merge policy"):
        refine(labels, must=[], cannot=[], merge="everything")
    with pytest.raises(ConfigError, match="merge"):  # an AL config fails at load time
        load_al_config({"manifest": "m.csv", "out": "o", "merge": "everything"})


def test_cannot_links_split_a_cluster_and_place_the_rest_by_embedding():
    labels = np.zeros(6, dtype=np.int64)
    feats = np.array([[1, 0], [0.9, 0.1], [1, 0.05], [0, 1], [0.1, 0.9], [0.05, 1]], np.float32)
    r = refine(labels, must=[], cannot=[(0, 3)], features=feats)
    assert r.labels[0] != r.labels[3]
    assert r.labels[1] == r.labels[2] == r.labels[0]
    assert r.labels[4] == r.labels[5] == r.labels[3]
    assert r.cannot_satisfied == 1 and r.n_splits == 1


def test_merge_then_split_honours_both_kinds():
    # must 0=2 merges clusters {0,1} and {2,3}; 1!=3 must then part them again
    labels = np.array([0, 0, 1, 1])
    r = refine(labels, must=[(0, 2)], cannot=[(1, 3), (0, 3)])
    assert r.labels[0] == r.labels[2]
    assert r.labels[1] != r.labels[3] and r.labels[0] != r.labels[3]
    assert r.must_satisfied == 1 and r.cannot_satisfied == 2


def test_contradictions_are_reported_with_their_chain_never_lost():
    labels = np.array([0, 0, 1, 2, 3])
    must = [(0, 1), (1, 2)]
    cannot = [(0, 2), (3, 4)]
    uf, found, ok = find_contradictions(5, must, cannot)
    assert found == [{"cannot": [0, 2], "must_path": [0, 1, 2]}]
    assert ok.tolist() == [False, True]
    r = refine(labels, must, cannot)
    assert r.contradictions == found
    s = r.summary()
    assert s["must_satisfied"] + 0 == s["must_links"] == 2
    assert s["cannot_satisfied"] + s["contradictions"] == s["cannot_links"] == 2


def test_refinement_holds_every_constraint_on_random_cases():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = 40
        truth = rng.integers(0, 6, n)
        labels = rng.integers(-1, 5, n)
        pairs = [tuple(sorted(rng.choice(n, 2, replace=False).tolist())) for _ in range(25)]
        must = [p for p in pairs if truth[p[0]] == truth[p[1]]]
        cannot = [p for p in pairs if truth[p[0]] != truth[p[1]]]
        feats = rng.normal(size=(n, 4)).astype(np.float32)
        for policy in MERGE_POLICIES:  # consistent answers: no contradictions
            r = refine(labels, must, cannot, feats, merge=policy)
            assert not r.contradictions, (trial, policy)
            assert all(r.labels[a] == r.labels[b] != NOISE for a, b in must), policy
            assert all(r.labels[a] != r.labels[b] or r.labels[a] == NOISE for a, b in cannot)


def test_refine_refuses_out_of_range_items():
    with pytest.raises(ReidRayError):
        refine(np.zeros(3, dtype=np.int64), must=[(0, 5)], cannot=[])
