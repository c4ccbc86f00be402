"""The toy zoo: deterministic, complete, a valid manifest, and identity carried by the pattern."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from reid_ray.data.splits import SPLIT_NAMES
from reid_ray.errors import ConfigError
from reid_ray.synth import ZooSummary, generate_zoo, sample_grid
from reid_ray.synth import zoo as zoo_mod

TINY = dict(species=2, individuals=4, images_per=3, size=96)


def _files(root: Path) -> dict[str, bytes]:
    """Every image file under root/images, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def _meta(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, ZooSummary]:
    root = tmp_path_factory.mktemp("zoo")
    summary = generate_zoo(str(root), species=3, individuals=7, images_per=4, size=128, seed=3)
    return root, summary


def test_same_seed_gives_identical_files(tmp_path):
    a = generate_zoo(str(tmp_path / "a"), **TINY, seed=5)
    b = generate_zoo(str(tmp_path / "b"), **TINY, seed=5)
    assert Path(a.metadata_path).read_bytes() == Path(b.metadata_path).read_bytes()
    assert Path(a.split_path).read_bytes() == Path(b.split_path).read_bytes()
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 12
    assert files_a == files_b


def test_different_seed_gives_different_zoo(tmp_path):
    generate_zoo(str(tmp_path / "a"), **TINY, seed=0)
    generate_zoo(str(tmp_path / "b"), **TINY, seed=1)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a.keys() == files_b.keys()
    assert all(files_a[k] != files_b[k] for k in files_a)
    assert _meta(tmp_path / "a")["bbox"].tolist() != _meta(tmp_path / "b")["bbox"].tolist()


def test_more_images_or_individuals_keep_the_existing_ones(tmp_path):
    """An individual's pattern and images come from (seed, species, index, image) only."""
    generate_zoo(str(tmp_path / "small"), **TINY, seed=2)
    generate_zoo(str(tmp_path / "big"), species=2, individuals=6, images_per=5, size=96, seed=2)
    small, big = _files(tmp_path / "small"), _files(tmp_path / "big")
    assert len(big) == 30
    assert all(big[k] == v for k, v in small.items())
    rows_small = _meta(tmp_path / "small").set_index("image_id")
    rows_big = _meta(tmp_path / "big").set_index("image_id").loc[rows_small.index]
    pd.testing.assert_frame_equal(rows_small, rows_big)


def test_counts_and_columns(zoo):
    root, summary = zoo
    meta = _meta(root)
    assert list(meta.columns) == list(zoo_mod.METADATA_COLUMNS)
    assert (summary.n_images, summary.n_individuals, summary.n_species) == (28, 7, 3)
    assert len(meta) == 28 and meta["image_id"].is_unique
    # 7 individuals over 3 species: 3, 2, 2; identities unique across species
    per_species = meta.groupby("species")["identity"].nunique()
    assert sorted(per_species.tolist()) == [2, 2, 3]
    assert per_species.index.tolist() == sorted(["spotted-cat", "striped-horse", "rosette-cat"])
    assert meta["identity"].nunique() == 7
    assert meta.groupby("identity")["species"].nunique().eq(1).all()
    assert set(meta["viewpoint"]) <= {"left", "right"}
    for date in meta["date"]:
        dt.date.fromisoformat(date)
    assert summary.seconds > 0


def test_paths_exist_decode_and_bbox_inside(zoo):
    root, _ = zoo
    for row in _meta(root).itertuples(index=False):
        assert not os.path.isabs(row.path)
        img = cv2.imread(str(root / row.path), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (128, 128, 3), row.path
        x, y, w, h = (int(v) for v in row.bbox.split(","))
        assert x >= 0 and y >= 0 and w > 8 and h > 8
        assert x + w <= 128 and y + h <= 128
        # the box holds the animal: it differs from the background around it
        assert img[y : y + h, x : x + w].std() > 5


def test_manifest_and_split_load_with_the_shared_reader(zoo):
    from reid_ray.data import load_image, read_manifest

    root, summary = zoo
    manifest = read_manifest(summary.metadata_path, split_file=summary.split_path)
    assert manifest.errors.num_rows == 0
    table = manifest.table.to_pylist()
    assert len(table) == 28
    crop = load_image(table[0]["path"], table[0]["bbox"])
    x, y, w, h = table[0]["bbox"]
    assert crop.shape == (int(h), int(w), 3)


def test_split_covers_the_ids_with_valid_names(zoo):
    root, summary = zoo
    split = pd.read_csv(summary.split_path, dtype=str)
    assert list(split.columns) == ["image_id", "split"]
    meta = _meta(root)
    assert set(split["image_id"]) == set(meta["image_id"])
    assert set(split["split"]) <= set(SPLIT_NAMES)
    # disjoint split: an individual sits in exactly one of train / val / test
    merged = meta.merge(split, on="image_id")
    part = merged["split"].replace({"query": "test", "gallery": "test"})
    assert merged.assign(part=part).groupby("identity")["part"].nunique().eq(1).all()
    assert {"train", "query", "gallery"} <= set(split["split"])


def test_closed_split_kind(tmp_path):
    summary = generate_zoo(str(tmp_path), **TINY, split_kind="closed")
    split = pd.read_csv(summary.split_path, dtype=str)
    assert set(split["split"]) == {"query", "gallery"}


def test_species_share_body_and_colours_individuals_differ():
    u = 128
    sp = zoo_mod.species_of(0)
    body = zoo_mod._body(sp.shape, u)
    a = zoo_mod.make_individual(0, 0, 0, body, u)
    b = zoo_mod.make_individual(0, 0, 1, body, u)
    # same silhouette for every individual; the right flank is the mirrored body
    assert np.array_equal(a.alpha[0], b.alpha[0])
    assert np.array_equal(a.alpha[1], a.alpha[0][:, ::-1])
    # the same two colours: both coats use the species' coat and ink only (with shading)
    inside = a.alpha[0] == 255
    for ind in (a, b):
        px = ind.bgr[0][inside].astype(np.float32)
        shade = body.shade[..., 0][inside][:, None]
        coat = np.asarray(sp.coat[::-1], np.float32) * shade
        ink = np.asarray(sp.ink[::-1], np.float32) * shade
        # each pixel lies on the segment between coat and ink colour (within rounding)
        t = ((px - coat) * (ink - coat)).sum(1) / ((ink - coat) ** 2).sum(1)
        residual = np.abs(coat + np.clip(t, 0, 1)[:, None] * (ink - coat) - px).max()
        assert residual < 2.0
    # but the patterns differ: between individuals and between one individual's flanks
    assert np.abs(a.bgr[0].astype(int) - b.bgr[0]).mean() > 10
    assert np.abs(a.bgr[0].astype(int) - a.bgr[1][:, ::-1]).mean() > 10


def test_pattern_carries_identity(tmp_path):
    """SIFT + MAGSAC finds many more inliers between two images of one individual (same
    flank) than between two individuals of the same species."""
    from reid_ray.synth.difficulty import sift_features, sift_inliers

    generate_zoo(str(tmp_path), species=2, individuals=4, images_per=6, size=192, seed=0)
    meta = _meta(tmp_path)
    sift = cv2.SIFT_create()
    feats = {
        r.image_id: sift_features(cv2.imread(str(tmp_path / r.path)), sift)
        for r in meta.itertuples()
    }
    same, other = [], []
    for _, group in meta.groupby(["species", "viewpoint"]):
        rows = list(group.itertuples())
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                n = sift_inliers(feats[a.image_id], feats[b.image_id])
                (same if a.identity == b.identity else other).append(n)
    assert len(same) >= 6 and len(other) >= 6
    # measured: about 15 vs 1.5 inliers on average
    assert np.mean(same) > 3 * np.mean(other)
    assert np.mean(same) > np.mean(other) + 8


def test_difficulty_report(zoo):
    from reid_ray.synth.difficulty import difficulty

    root, _ = zoo
    report = difficulty(str(root))
    assert report["n_queries"] > 0 and report["n_gallery"] > 0
    for method in ("random_net", "sift"):
        assert 0.0 <= report[method]["top1"] <= 1.0
        assert 0.0 < report[method]["mAP"] <= 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(individuals=2, species=3),
        dict(size=16),
        dict(seed=-1),
        dict(images_per=0),
        dict(split_kind="random"),
        dict(individuals=2.5),
    ],
)
def test_bad_arguments_fail_fast(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        generate_zoo(str(tmp_path / "z"), **kwargs)
    assert not (tmp_path / "z").exists()


def test_rerun_replaces_a_previous_zoo(tmp_path):
    generate_zoo(str(tmp_path), **TINY, seed=0)
    generate_zoo(str(tmp_path), species=1, individuals=2, images_per=2, size=96, seed=0)
    meta = _meta(tmp_path)
    assert len(meta) == 4
    split = pd.read_csv(tmp_path / "split.csv", dtype=str)
    assert set(split["image_id"]) == set(meta["image_id"])


def test_sample_grid(zoo, tmp_path):
    root, _ = zoo
    png = sample_grid(str(root), str(tmp_path / "grid.png"), individuals=3, images=4, thumb=64)
    img = cv2.imread(png, cv2.IMREAD_COLOR)
    assert img.shape == (3 * 64, 4 * 64, 3)
    # rows come from different species (round-robin), so the grid is not blank
    assert img.std() > 20


def test_ray_tasks_write_the_same_zoo(tmp_path, ray_cluster, monkeypatch):
    """Large zoos render as Ray tasks; the files must be those of the in-process path."""
    generate_zoo(str(tmp_path / "local"), **TINY, seed=4)
    monkeypatch.setattr(zoo_mod, "RAY_MIN_IMAGES", 0)
    monkeypatch.setattr(zoo_mod, "RAY_CHUNK_IMAGES", 6)  # two individuals per task
    generate_zoo(str(tmp_path / "ray"), **TINY, seed=4)
    assert (tmp_path / "local/metadata.csv").read_bytes() == (
        tmp_path / "ray/metadata.csv"
    ).read_bytes()
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")


def test_zoo_on_s3(s3_bucket):
    from reid_ray.data import load_image, read_manifest

    out = f"{s3_bucket}/zoo"
    summary = generate_zoo(out, species=1, individuals=2, images_per=2, size=64)
    manifest = read_manifest(summary.metadata_path, split_file=summary.split_path)
    assert manifest.errors.num_rows == 0 and manifest.table.num_rows == 4
    row = manifest.table.to_pylist()[0]
    assert row["path"].startswith("s3://")
    assert load_image(row["path"]).shape == (64, 64, 3)
