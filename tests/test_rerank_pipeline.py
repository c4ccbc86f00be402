"""Re-ranking on a real local Ray cluster through its one entry point, ``rerank_candidates``:
the feature and matcher actor pools on real image files, the feature cache (once per image,
cached equals uncached), resumability, bad images, calibrated fusion end to end, and the
command."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from reid_ray.data import read_manifest
from reid_ray.errors import ConfigError, OutputError
from reid_ray.rerank import FusionModel, RerankConfig, rerank_candidates
from reid_ray.rerank.fusion import fit_fusion

SIFT = dict(extractor="sift", matcher="classical", max_keypoints=200, resize_long_side=224)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from reid_ray.synth import generate_zoo

    out = tmp_path_factory.mktemp("rerank-pipeline-zoo")
    generate_zoo(str(out), species=2, individuals=8, images_per=4, size=160, seed=1)
    return read_manifest(str(out / "metadata.csv"))


@pytest.fixture(scope="module")
def fusion() -> FusionModel:
    """A fitted fusion (any will do where a test is about scoring, not calibration)."""
    rng = np.random.default_rng(0)
    same = rng.random(400) < 0.2
    return fit_fusion(rng.random(400) + same, rng.uniform(0, 30, 400) + 40 * same, same)


def _rows(manifest):
    return manifest.table.to_pylist()


def _candidates_for(manifest, queries, per_query=5):
    """For each query image: its same-identity images first, then others (real pairs), with
    a decreasing global score and 1-based ranks."""
    rows = _rows(manifest)
    out = {"query_id": [], "gallery_id": [], "score": [], "rank": []}
    for q in queries:
        same = [
            r["image_id"]
            for r in rows
            if r["identity"] == q["identity"] and r["image_id"] != q["image_id"]
        ]
        other = [r["image_id"] for r in rows if r["identity"] != q["identity"]]
        for rank, g in enumerate((same + other)[:per_query], start=1):
            out["query_id"].append(q["image_id"])
            out["gallery_id"].append(g)
            out["score"].append(1.0 - rank / 10)
            out["rank"].append(rank)
    return pa.table(out)


def _stored_pairs(out):
    files = sorted((out / "scores" / "pairs").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pandas() if files else None


@pytest.mark.slow
def test_lightglue_through_the_actor_pool_on_real_files(ray_cluster, zoo, fusion, tmp_path):
    cfg = RerankConfig(
        extractor="aliked",
        matcher="lightglue",
        max_keypoints=96,
        resize_long_side=160,
        queries_per_batch=2,
        batch_size=4,
    )
    rows = _rows(zoo)
    cands = _candidates_for(zoo, [rows[0], rows[4], rows[8]], per_query=5)
    result = rerank_candidates(cands, zoo, cfg, str(tmp_path), fusion=fusion)
    df = result.ranked.to_pandas()
    assert len(df) == 15 and df["local_score"].notna().all() and result.errors.num_rows == 0
    assert result.stats["pairs_scored"] == 15 and result.stats["scoring"]["pool"]["actors"] >= 1
    images = set(df["query_id"]) | set(df["gallery_id"])
    assert result.stats["scoring"]["images_extracted"] == len(images)
    ident = {r["image_id"]: (r["identity"], r["viewpoint"]) for r in rows}
    pairs = list(zip(df["query_id"], df["gallery_id"], strict=True))
    same_view = df[[ident[q] == ident[g] for q, g in pairs]]
    other = df[[ident[q][0] != ident[g][0] for q, g in pairs]]
    assert len(same_view) >= 1 and len(other) >= 6
    assert same_view["local_score"].min() > other["local_score"].median()
    # features were extracted once per image and written to the cache
    assert len(list((tmp_path / "features").rglob("*.npz"))) == len(images)
    assert (tmp_path / "fusion.json").exists()


@pytest.mark.slow
def test_features_once_per_image_and_cached_equals_uncached(ray_cluster, zoo, fusion, tmp_path):
    """The path the pipeline uses: the feature actors fill the cache once per image; a rerun
    (here a new output folder sharing the cache) reads it and scores exactly as a fresh
    run with an empty cache; two halves fill the cache as the whole does."""
    rows = _rows(zoo)
    cands = _candidates_for(zoo, rows[0:16:4], per_query=6)  # 4 queries x 6 candidates
    images = set(cands["query_id"].to_pylist()) | set(cands["gallery_id"].to_pylist())
    shared = RerankConfig(**SIFT, cache_dir=str(tmp_path / "cache"))
    first = rerank_candidates(cands, zoo, shared, str(tmp_path / "a"), fusion=fusion)
    st = first.stats["scoring"]
    assert st["images_extracted"] == len(images) < cands.num_rows  # per image, not per pair
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == len(images)
    again = rerank_candidates(cands, zoo, shared, str(tmp_path / "b"), fusion=fusion)
    assert again.stats["scoring"]["images_extracted"] == 0
    assert again.stats["scoring"]["images_cached"] == len(images)
    assert again.stats["pairs_scored"] == cands.num_rows  # new scores folder: matched again
    fresh = rerank_candidates(cands, zoo, RerankConfig(**SIFT), str(tmp_path / "c"), fusion=fusion)
    assert fresh.stats["scoring"]["images_extracted"] == len(images)
    for res in (first, again):
        assert res.ranked.equals(fresh.ranked)
    # halves: the second half extracts only the images the first did not need
    halves = RerankConfig(**SIFT, cache_dir=str(tmp_path / "halves"))
    part = cands.slice(0, 12)
    rerank_candidates(part, zoo, halves, str(tmp_path / "h1"), fusion=fusion)
    whole = rerank_candidates(cands, zoo, halves, str(tmp_path / "h2"), fusion=fusion)
    part_images = set(part["query_id"].to_pylist()) | set(part["gallery_id"].to_pylist())
    assert whole.stats["scoring"]["images_extracted"] == len(images - part_images)
    assert whole.ranked.equals(fresh.ranked)


@pytest.mark.slow
def test_resume_skips_finished_queries_without_duplicates(ray_cluster, zoo, fusion, tmp_path):
    cfg = RerankConfig(**SIFT, queries_per_batch=1)
    rows = _rows(zoo)
    cands = _candidates_for(zoo, rows[0:16:4], per_query=4)  # 4 queries x 4 candidates
    out = str(tmp_path / "out")
    r1 = rerank_candidates(cands.slice(0, 8), zoo, cfg, out, fusion=fusion)
    assert r1.stats["pairs_scored"] == 8
    r2 = rerank_candidates(cands, zoo, cfg, out, fusion=fusion)  # the "interrupted" run, resumed
    assert r2.stats["pairs_scored"] == 8 and r2.stats["scoring"]["queries_resumed"] == 2
    r3 = rerank_candidates(cands, zoo, cfg, out, fusion=fusion)
    assert r3.stats["pairs_scored"] == 0 and r3.stats["pairs_cached"] == 16
    stored = _stored_pairs(tmp_path / "out")
    assert len(stored) == 16 and not stored.duplicated(["query_id", "gallery_id"]).any()
    fresh = rerank_candidates(cands, zoo, cfg, str(tmp_path / "fresh"), fusion=fusion)
    assert r3.ranked.equals(fresh.ranked)
    # other settings in the same folder: refused, unless overwritten
    other = cfg.replace(max_keypoints=100)
    with pytest.raises(OutputError, match="other settings"):
        rerank_candidates(cands, zoo, other, out, fusion=fusion)
    r4 = rerank_candidates(cands, zoo, other, out, fusion=fusion, overwrite=True)
    assert r4.stats["pairs_scored"] == 16


@pytest.mark.slow
def test_bad_images_get_null_scores_and_error_rows(ray_cluster, zoo, fusion, tmp_path):
    from reid_ray.data import Manifest

    rows = _rows(zoo)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    extra = [
        dict(rows[0], image_id="corrupt", path=str(tmp_path / "corrupt.jpg")),
        dict(rows[0], image_id="gone", path=str(tmp_path / "gone.jpg")),
    ]
    manifest = Manifest(pa.Table.from_pylist(rows + extra, schema=zoo.table.schema))
    q = rows[0]["image_id"]
    cands = pa.table(
        {
            "query_id": [q, q, q, "gone", "not-in-manifest"],
            "gallery_id": [rows[1]["image_id"], "corrupt", "gone", q, q],
            "score": [0.9, 0.8, 0.7, 0.9, 0.9],
        }
    )
    cfg = RerankConfig(**SIFT)
    result = rerank_candidates(cands, manifest, cfg, str(tmp_path / "out"), fusion=fusion)
    local = {(r["query_id"], r["gallery_id"]): r["local_score"] for r in result.ranked.to_pylist()}
    assert local[(q, rows[1]["image_id"])] is not None
    assert [local[(q, "corrupt")], local[(q, "gone")], local[("gone", q)]] == [None] * 3
    assert local[("not-in-manifest", q)] is None
    errors = {r["image_id"]: r for r in result.errors.to_pylist()}
    assert set(errors) == {"corrupt", "gone", "not-in-manifest"}
    assert "missing file" in errors["gone"]["reason"]
    assert errors["gone"]["path"].endswith("gone.jpg")
    assert "not an image" in errors["corrupt"]["reason"] or "corrupt" in errors["corrupt"]["reason"]
    assert errors["not-in-manifest"]["stage"] == "rerank-manifest"
    assert result.stats["scoring"]["pairs_without_score"] == 4
    # a rerun reports the same errors and does not match the good pair again
    again = rerank_candidates(cands, manifest, cfg, str(tmp_path / "out"), fusion=fusion)
    assert again.stats["pairs_scored"] == 0 and again.errors.num_rows == 3


def _query_gallery_candidates(manifest, quality: str, seed: int = 0):
    """Queries: each individual's first image; gallery: the rest. Global scores either carry
    no information (``weak``) or separate the identities (``strong``)."""
    rng = np.random.default_rng(seed)
    rows = _rows(manifest)
    seen, queries, gallery = set(), [], []
    for r in rows:
        (gallery if r["identity"] in seen else queries).append(r)
        seen.add(r["identity"])

    def candidates(qs, gs, leave_one_out):
        out = {"query_id": [], "gallery_id": [], "score": [], "rank": []}
        for q in qs:
            cands = [g for g in gs if not (leave_one_out and g["image_id"] == q["image_id"])]
            same = np.array([g["identity"] == q["identity"] for g in cands])
            noise = rng.uniform(0.2, 0.6, len(cands))
            score = noise + (0.4 * same if quality == "strong" else 0.0)
            for rank, k in enumerate(np.argsort(-score, kind="stable"), start=1):
                out["query_id"].append(q["image_id"])
                out["gallery_id"].append(cands[k]["image_id"])
                out["score"].append(float(score[k]))
                out["rank"].append(rank)
        return pa.table(out)

    return candidates(queries, gallery, False), candidates(gallery, gallery, True)


def _top1(table, manifest):
    ident = {r["image_id"]: r["identity"] for r in _rows(manifest)}
    df = table.to_pandas().sort_values(["query_id", "rank"]).drop_duplicates("query_id")
    pairs = zip(df["query_id"], df["gallery_id"], strict=True)
    return float(np.mean([ident[q] == ident[g] for q, g in pairs]))


@pytest.mark.slow
def test_calibrated_fusion_lifts_a_weak_global_model_and_keeps_a_strong_one(
    ray_cluster, zoo, tmp_path
):
    cfg = RerankConfig(**SIFT, calibration_top_k=10, calibration_queries=50, queries_per_batch=4)
    ident = {r["image_id"]: r["identity"] for r in _rows(zoo)}
    for quality in ("weak", "strong"):
        qc, gc = _query_gallery_candidates(zoo, quality)
        result = rerank_candidates(qc, zoo, cfg, str(tmp_path / quality), calibration_candidates=gc)
        assert (tmp_path / quality / "fusion.json").exists()
        p = result.ranked["probability"].to_numpy()
        assert np.all((p >= 0) & (p <= 1)) and result.ranked.num_rows == qc.num_rows
        cal = result.calibration.to_pandas()
        assert cal["local_score"].notna().all() and result.stats["calibration"]["same_pairs"] > 0
        # the guarantee: every calibration query keeps its first same-identity candidate and
        # at least 5 other-identity ones (the 5 highest-ranked)
        gdf = gc.to_pandas()
        for q, rows in cal.groupby("query_id"):
            cands = gdf[gdf["query_id"] == q].sort_values("rank")
            is_same = cands["gallery_id"].map(ident) == ident[q]
            assert cands.loc[is_same, "gallery_id"].iloc[0] in set(rows["gallery_id"])
            assert set(cands.loc[~is_same, "gallery_id"].iloc[:5]) <= set(rows["gallery_id"])
        if quality == "weak":
            assert _top1(result.ranked, zoo) >= _top1(qc, zoo) + 0.4
            assert result.fusion.weight > 0
        else:  # nothing to gain over a perfect global model: its order is kept, and why
            assert (
                result.fusion.weight == 0.0 and "no weight beats" in result.stats["weight_reason"]
            )
            got = result.ranked.to_pandas()
            want = qc.to_pandas().sort_values(["query_id", "rank"])
            assert got["gallery_id"].tolist() == want["gallery_id"].tolist()


@pytest.mark.slow
def test_too_few_calibration_negatives_are_refused_before_matching(ray_cluster, zoo, tmp_path):
    qc, gc = _query_gallery_candidates(zoo, "weak")
    few = gc.filter(pc.is_in(gc["query_id"], pa.array(gc["query_id"].to_pylist()[:1])))
    with pytest.raises(ConfigError, match="min_negatives=20"):
        rerank_candidates(
            qc, zoo, RerankConfig(**SIFT), str(tmp_path / "out"), calibration_candidates=few
        )
    assert not (tmp_path / "out" / "scores").exists()


@pytest.mark.slow
def test_rerank_command_writes_outputs_and_pictures(ray_cluster, zoo, tmp_path):
    import typer
    from typer.testing import CliRunner

    from reid_ray.rerank.commands import rerank_command

    app = typer.Typer()
    app.command()(rerank_command)
    qc, gc = _query_gallery_candidates(zoo, "weak")
    pq.write_table(qc, tmp_path / "candidates.parquet")
    pq.write_table(gc, tmp_path / "gallery_candidates.parquet")
    out = tmp_path / "out"
    args = [
        "--candidates",
        str(tmp_path / "candidates.parquet"),
        "--manifest",
        zoo.source or "",
        "--out",
        str(out),
        "--extractor",
        "sift",
        "--matcher",
        "classical",
        "--max-keypoints",
        "200",
        "--resize",
        "224",
        "--calibration",
        str(tmp_path / "gallery_candidates.parquet"),
        "--viz",
        "2",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "manifest.json").read_text())
    assert summary["counts"]["pairs"] > 0 and summary["counts"]["errors"] == 0
    assert summary["throughput"]["pairs_per_s"] > 0 and summary["fusion"]["weight_reason"]
    assert pq.read_table(out / "reranked" / "part-00000.parquet").num_rows == qc.num_rows
    assert pq.read_table(out / "predictions" / "part-00000.parquet").num_rows == 8
    assert pq.read_table(out / "calibration" / "part-00000.parquet").num_rows > 0
    assert (out / "fusion.json").exists() and len(list((out / "viz").glob("*.jpg"))) == 2
    assert "pairs/s" in res.output
    # reuse the fitted fusion: nothing is matched again
    again = CliRunner().invoke(app, args[:14] + ["--fusion", str(out / "fusion.json")])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "manifest.json").read_text())["counts"]["pairs_matched_now"] == 0
    bad = CliRunner().invoke(app, args[:6] + ["--extractor", "orb"])
    assert bad.exit_code == 2 and "extractor must be one of" in bad.output
    neither = CliRunner().invoke(app, args[:14])
    assert neither.exit_code == 2 and "--calibration" in neither.output
