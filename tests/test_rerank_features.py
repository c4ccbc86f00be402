"""Re-ranking: local features, the feature cache and the matchers on real image files with
the real pretrained weights (no Ray here; the actor pool is in test_rerank_pipeline.py)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from reid_ray.data import read_manifest
from reid_ray.errors import ModelError
from reid_ray.rerank import RerankConfig
from reid_ray.rerank.cache import FeatureCache
from reid_ray.rerank.features import (
    build_extractor,
    feature_fingerprint,
    load_prepared,
    prepare_image,
)
from reid_ray.rerank.matchers import PairScorer, build_lightglue, preserved_torch_flags


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread, as in the actors: on a shared 2-core machine two OpenMP threads
    make LightGlue many times slower (they spin while the other cores are busy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from reid_ray.synth import generate_zoo

    out = tmp_path_factory.mktemp("rerank-zoo")
    generate_zoo(str(out), species=2, individuals=4, images_per=4, size=192, seed=0)
    return read_manifest(str(out / "metadata.csv")).table.to_pylist()


def _pairs_by_kind(rows):
    same_view, different = [], []
    for i, j in itertools.combinations(range(len(rows)), 2):
        a, b = rows[i], rows[j]
        if a["identity"] != b["identity"]:
            different.append((i, j))
        elif a["viewpoint"] == b["viewpoint"]:
            same_view.append((i, j))
    return same_view, different


def _extract_all(rows, cfg):
    ex = build_extractor(cfg)
    return [ex.extract(*load_prepared(r, cfg)) for r in rows]


def test_classical_matcher_gives_more_inliers_for_the_same_individual(zoo):
    cfg = RerankConfig(
        extractor="sift", matcher="classical", max_keypoints=256, resize_long_side=256
    )
    feats = _extract_all(zoo, cfg)
    scorer = PairScorer(cfg)
    same_view, different = _pairs_by_kind(zoo)
    assert len(same_view) >= 5 and len(different) >= 20
    same = np.array([scorer.score(feats[i], [feats[j]])[0][0] for i, j in same_view])
    diff = np.array([scorer.score(feats[i], [feats[j]])[0][0] for i, j in different])
    # the same flank of the same animal: MAGSAC inliers; two animals: a handful of chance ones
    assert np.median(same) > 3 * max(np.median(diff), 1.0)
    assert np.mean(same > np.percentile(diff, 90)) >= 0.8


@pytest.mark.parametrize("extractor", ["disk", "aliked"])
def test_lightglue_separates_identities(zoo, extractor):
    cfg = RerankConfig(
        extractor=extractor, matcher="lightglue", max_keypoints=128, resize_long_side=192
    )
    feats = _extract_all(zoo, cfg)
    for f in feats:
        assert 0 < len(f) <= 128
        assert f.descriptors.shape == (len(f), 128)
        np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-3)
        w, h = f.image_size
        assert max(w, h) == 192
        assert np.all((f.keypoints >= -0.5) & (f.keypoints <= np.array([w, h]) - 0.5))
    scorer = PairScorer(cfg)
    same_view, different = _pairs_by_kind(zoo)
    # one query against all its candidates in one call: batched where sizes agree
    q = same_view[0][0]
    cands = [j for j in range(len(zoo)) if j != q][:5]
    batched = scorer.score(feats[q], [feats[j] for j in cands])
    single = [scorer.score(feats[q], [feats[j]])[0] for j in cands]
    np.testing.assert_allclose(
        [s for s, _ in batched], [s for s, _ in single], rtol=1e-4, atol=1e-4
    )
    same = np.array([scorer.score(feats[i], [feats[j]])[0][0] for i, j in same_view[:4]])
    diff = np.array([scorer.score(feats[i], [feats[j]])[0][0] for i, j in different[::4][:8]])
    assert np.median(same) > 3 * max(np.median(diff), 1.0)


def test_mask_limits_keypoints_and_small_crops_are_upscaled(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(60, 90, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(cv2.resize(img, (90, 60), interpolation=cv2.INTER_NEAREST), (3, 3), 0)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    mask = np.zeros((60, 90), np.uint8)
    mask[:, :45] = 255  # the left half is the animal
    cv2.imwrite(str(tmp_path / "a_mask.png"), mask)
    prepared, scale = prepare_image(img, 240)
    assert prepared.shape[:2] == (160, 240) and scale == pytest.approx(240 / 90)
    row = {
        "image_id": "a",
        "path": str(tmp_path / "a.png"),
        "bbox": None,
        "mask": str(tmp_path / "a_mask.png"),
    }
    for extractor in ("sift", "disk", "aliked"):
        cfg = RerankConfig(
            extractor=extractor, matcher="classical", max_keypoints=200, resize_long_side=240
        )
        ex = build_extractor(cfg)
        masked = ex.extract(*load_prepared(row, cfg))
        whole = ex.extract(*load_prepared(row, cfg.replace(use_mask=False)))
        assert len(masked) > 10, extractor
        assert masked.keypoints[:, 0].max() < 121, extractor  # inside the left half (+1 px)
        assert whole.keypoints[:, 0].max() > 130, extractor


def test_cache_round_trip_and_listing(zoo, tmp_path):
    """Entries read back equal what was extracted; ``missing`` finds what is absent with one
    listing. (Cached equals uncached through the actor pools: test_rerank_pipeline.py.)"""
    cfg = RerankConfig(
        extractor="disk", matcher="lightglue", max_keypoints=64, resize_long_side=128
    )
    ex = build_extractor(cfg)
    feats = {r["image_id"]: ex.extract(*load_prepared(r, cfg)) for r in zoo[:3]}
    cache = FeatureCache(str(tmp_path / "cache"), feature_fingerprint(cfg))
    ids = [r["image_id"] for r in zoo[:4]]
    assert cache.missing(ids + ids[:1]) == ids  # first-seen order, no duplicates
    for i, f in feats.items():
        cache.put(i, f)
    fresh = FeatureCache(str(tmp_path / "cache"), feature_fingerprint(cfg), memory_items=0)
    assert fresh.missing(ids) == ids[3:]
    for i, f in feats.items():
        assert fresh.get(i).equals(f)
    assert fresh.get(ids[3]) is None


def test_cache_is_keyed_by_extractor_settings():
    base = RerankConfig(extractor="aliked", max_keypoints=64)
    assert feature_fingerprint(base) == feature_fingerprint(
        base.replace(matcher="classical", top_k=5)
    )
    for change in (
        {"max_keypoints": 65},
        {"resize_long_side": 256},
        {"use_bbox": False},
        {"use_mask": False},
        {"extractor": "disk"},
    ):
        assert feature_fingerprint(base.replace(**change)) != feature_fingerprint(base), change


def test_cache_on_s3(zoo, s3_bucket):
    cfg = RerankConfig(
        extractor="sift", matcher="classical", max_keypoints=64, resize_long_side=128
    )
    ex = build_extractor(cfg)
    cache = FeatureCache(f"{s3_bucket}/features", feature_fingerprint(cfg))
    ids = [r["image_id"] for r in zoo[:4]]
    assert cache.missing(ids[:3]) == ids[:3]
    feats = {r["image_id"]: ex.extract(*load_prepared(r, cfg)) for r in zoo[:3]}
    for i, f in feats.items():
        cache.put(i, f)
    fresh = FeatureCache(f"{s3_bucket}/features", feature_fingerprint(cfg))
    assert fresh.missing(ids) == [ids[3]]
    assert fresh.get(ids[0]).equals(feats[ids[0]])


def test_missing_weights_fail_fast_with_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REID_RAY_LOCAL_WEIGHTS", str(tmp_path))
    with pytest.raises(ModelError, match="disk-depth-save.pth.*not found"):
        build_extractor(RerankConfig(extractor="disk"))
    with pytest.raises(ModelError, match="aliked_lightglue.pth.*not found"):
        build_lightglue("aliked")
    (tmp_path / "aliked-n16.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot load"):
        build_extractor(RerankConfig(extractor="aliked"))


def test_building_lightglue_leaves_global_torch_flags_alone():
    import torch

    before = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.flash_sdp_enabled(),
    )
    build_lightglue("disk")
    after = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.flash_sdp_enabled(),
    )
    assert before == after
    # and the guard restores flags that something inside changed
    with preserved_torch_flags():
        torch.backends.cudnn.deterministic = not before[0]
    assert torch.backends.cudnn.deterministic == before[0]
