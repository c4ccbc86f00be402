"""Re-ranking: pure parts (config, classical matching kernels, fusion calibration). No Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from reid_ray.errors import ConfigError
from reid_ray.rerank import FusionModel, RerankConfig, load_rerank_config, rerank_candidates
from reid_ray.rerank.fusion import fit_fusion, ranking_quality
from reid_ray.rerank.matchers import mutual_ratio_matches, verify_geometry
from reid_ray.rerank.ranking import apply_fusion, candidates_frame

# -- config -------------------------------------------------------------------------------------


def test_config_loader_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting.*max_keypoint"):
        load_rerank_config({"max_keypoint": 10})
    with pytest.raises(ConfigError, match="lightglue"):
        load_rerank_config(extractor="sift", matcher="lightglue")
    with pytest.raises(ConfigError, match="extractor must be one of"):
        load_rerank_config(extractor="orb")
    with pytest.raises(ConfigError, match="top_k"):
        load_rerank_config(top_k=0)
    path = tmp_path / "rerank.yaml"
    path.write_text(
        "extractor: sift\nmatcher: classical\nmax_keypoints: '128'\nuse_mask: 'false'\n"
    )
    cfg = load_rerank_config(str(path), top_k=7, device=None)
    assert (cfg.extractor, cfg.matcher, cfg.max_keypoints, cfg.use_mask, cfg.top_k) == (
        "sift",
        "classical",
        128,
        False,
        7,
    )
    assert cfg.score_kind == "inliers" and cfg.geometry_kind == "homography"
    assert RerankConfig().score_kind == "confidence" and RerankConfig().geometry_kind == "none"
    with pytest.raises(ConfigError, match="must hold a mapping"):
        (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
        load_rerank_config(str(tmp_path / "bad.yaml"))


# -- classical matching kernels -----------------------------------------------------------------


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_mutual_ratio_matches_hand_computed():
    d0 = _unit([[1, 0, 0], [0, 1, 0], [0.7, 0.7, 0.1]])
    d1 = _unit([[0.98, 0.05, 0], [0, 0.99, 0.05], [0, 0, 1]])
    matches, conf = mutual_ratio_matches(d0, d1, ratio=0.8)
    # 0<->0 and 1<->1 are mutual and distinctive; 2 is ambiguous between 0 and 1 (ratio ~ 1)
    assert matches.tolist() == [[0, 0], [1, 1]]
    assert conf.shape == (2,) and np.all((conf > 0) & (conf <= 1))
    # ratio 1.0 cannot reject anything distinctive; 2 still fails (its nearest is not mutual)
    assert mutual_ratio_matches(d0, d1, ratio=1.0)[0].tolist() == [[0, 0], [1, 1]]


def test_mutual_ratio_matches_empty_and_single():
    d = _unit(np.eye(4)[:3])
    assert mutual_ratio_matches(d, d[:0])[0].shape == (0, 2)
    assert mutual_ratio_matches(d[:0], d)[0].shape == (0, 2)
    matches, conf = mutual_ratio_matches(d[:1], d[:1])
    assert matches.tolist() == [[0, 0]] and conf.tolist() == [1.0]
    with pytest.raises(ValueError, match="dimensions"):
        mutual_ratio_matches(d, _unit(np.eye(5)[:2]))


def test_verify_geometry_keeps_homography_inliers():
    rng = np.random.default_rng(0)
    kp0 = rng.uniform(0, 200, size=(60, 2)).astype(np.float32)
    H = np.array([[0.9, -0.2, 15], [0.2, 0.9, -5], [0, 0, 1]])
    kp1 = (np.c_[kp0, np.ones(60)] @ H.T)[:, :2].astype(np.float32)
    kp1[40:] = rng.uniform(0, 200, size=(20, 2))  # 20 outliers
    matches = np.stack([np.arange(60), np.arange(60)], axis=1)
    inl = verify_geometry(kp0, kp1, matches, "homography", 3.0)
    assert inl[:40].all() and inl[40:].sum() <= 2
    assert verify_geometry(kp0, kp1, matches[:3], "homography", 3.0).tolist() == [False] * 3
    assert verify_geometry(kp0, kp1, matches, "none", 3.0).all()


# -- fusion ------------------------------------------------------------------------------------------


def _pairs(rng, n_queries=60, k=10, global_quality=0.0, local_quality=1.0):
    """Labelled pairs: each query has one same-individual candidate among k. Scores are
    noise plus ``quality`` x the label."""
    q = np.repeat(np.arange(n_queries), k).astype(str)
    same = np.zeros(n_queries * k, dtype=bool)
    same[np.arange(n_queries) * k + rng.integers(0, k, n_queries)] = True
    g = 0.5 + 0.1 * rng.standard_normal(same.size) + global_quality * same
    loc = np.maximum(0, 10 + 5 * rng.standard_normal(same.size) + 60 * local_quality * same)
    return q, g, loc, same


def test_fusion_probabilities_are_monotone_and_bounded():
    rng = np.random.default_rng(1)
    q, g, loc, same = _pairs(rng, global_quality=0.05, local_quality=0.5)
    for method in ("isotonic", "logistic"):
        model = fit_fusion(g, loc, same, query_ids=q, method=method)
        grid_g = np.linspace(0.0, 1.2, 50)
        for fixed_local in (0.0, 20.0, 80.0):
            p = model.predict_proba(grid_g, np.full(50, fixed_local))
            assert np.all((p >= 0) & (p <= 1))
            assert np.all(np.diff(p) >= -1e-12)
        grid_l = np.linspace(0, 200, 50)
        p = model.predict_proba(np.full(50, 0.5), grid_l)
        assert np.all(np.diff(p) >= -1e-12)
        assert model.weight > 0  # the local score is the informative one here
        assert p[-1] > 0.8 and p[0] < 0.3  # a strong local score means "same"
        # stored and loaded: the same numbers
        again = FusionModel.from_dict(model.to_dict())
        assert np.array_equal(again.predict_proba(g, loc), model.predict_proba(g, loc))


def test_fusion_lifts_weak_global_and_keeps_strong_global():
    rng = np.random.default_rng(2)
    # weak global, informative local: fused ranking beats global
    q, g, loc, same = _pairs(rng, global_quality=0.02, local_quality=1.0)
    model = fit_fusion(g, loc, same, query_ids=q)
    qi = np.unique(q, return_inverse=True)[1]
    q2, g2, loc2, same2 = _pairs(np.random.default_rng(3), global_quality=0.02, local_quality=1.0)
    qi2 = np.unique(q2, return_inverse=True)[1]
    top1_global = ranking_quality(qi2, g2, g2, same2)[0]
    top1_fused = ranking_quality(qi2, model.fused_score(g2, loc2), g2, same2)[0]
    assert top1_fused > top1_global + 0.3
    # strong global, uninformative local: the weight goes to 0 and the order is the global one
    q, g, loc, same = _pairs(rng, global_quality=0.5, local_quality=0.0)
    model = fit_fusion(g, loc, same, query_ids=q)
    assert model.weight == 0.0
    top1_global = ranking_quality(qi, g, g, same)[0]
    assert ranking_quality(qi, model.fused_score(g, loc), g, same)[0] == top1_global == 1.0


def test_fusion_missing_local_uses_the_global_part():
    rng = np.random.default_rng(4)
    q, g, loc, same = _pairs(rng, global_quality=0.1, local_quality=0.5)
    loc = loc.copy()
    loc[::7] = np.nan
    model = fit_fusion(g, loc, same, query_ids=q)
    p = model.predict_proba(np.array([0.5, 0.9]), np.array([np.nan, np.nan]))
    assert np.all(np.isfinite(p)) and p[1] >= p[0]


def test_fusion_refuses_uncalibrated_and_bad_labels():
    with pytest.raises(ConfigError, match="both kinds"):
        fit_fusion(np.array([0.1, 0.2]), np.array([1.0, 2.0]), np.array([True, True]))
    with pytest.raises(ConfigError, match="not a calibrated fusion model"):
        FusionModel.from_dict({"weight": 0.5})
    with pytest.raises(ConfigError, match="not calibrated"):
        FusionModel(None, None, None, 0.5)  # type: ignore[arg-type]
    cands = pa.table({"query_id": ["q"], "gallery_id": ["g"], "score": [0.5], "rank": [1]})
    with pytest.raises(ConfigError, match="uncalibrated"):
        rerank_candidates(cands, pa.table({"image_id": ["q"]}), RerankConfig(), "/nonexistent")
    with pytest.raises(ConfigError, match="calibrated fusion"):
        apply_fusion(candidates_frame(cands, "candidates"), None, 10)  # type: ignore[arg-type]


def test_rerank_orders_by_fused_score_and_keeps_the_tail():
    rng = np.random.default_rng(5)
    q, g, loc, same = _pairs(rng, global_quality=0.0, local_quality=1.0)
    model = fit_fusion(g, loc, same, query_ids=q)
    cands = pa.table(
        {
            "query_id": ["a"] * 4,
            "gallery_id": ["g1", "g2", "g3", "g4"],
            "rank": [1, 2, 3, 4],
            "score": [0.9, 0.8, 0.7, 0.6],
        }
    )
    frame = candidates_frame(cands, "candidates")
    frame["local_score"] = [1.0, 2.0, 90.0, 500.0]
    out = apply_fusion(frame, model, top_k=3)
    rows = out.to_pylist()
    assert out.column_names == [
        "query_id", "rank", "gallery_id", "global_score", "local_score", "fused_score",
        "probability",
    ]  # fmt: skip
    # g3 (strong local score) rises to the top; g4 is beyond top_k: stays last, no local score
    assert [r["gallery_id"] for r in rows][0] == "g3"
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["gallery_id"] == "g4" and rows[-1]["local_score"] is None
    assert all(0 <= r["probability"] <= 1 for r in rows)
