"""Re-ranking on a real local Ray cluster: the feature and matcher actor pools on real image
files, resumability, bad images, calibrated fusion end to end, and the command."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reid_ray.data import read_manifest
from reid_ray.errors import OutputError
from reid_ray.rerank import (
    RerankConfig,
    rerank_with_calibration,
    score_pairs,
    score_pairs_detailed,
    top_predictions,
)

SIFT = dict(extractor="sift", matcher="classical", max_keypoints=200, resize_long_side=224)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from reid_ray.synth import generate_zoo

    out = tmp_path_factory.mktemp("rerank-pipeline-zoo")
    generate_zoo(str(out), species=2, individuals=8, images_per=4, size=160, seed=1)
    return read_manifest(str(out / "metadata.csv"))


def _rows(manifest):
    return manifest.table.to_pylist()


def _pairs_for(manifest, queries, per_query=5):
    """For each query image: its same-identity images first, then others (real pairs)."""
    rows = _rows(manifest)
    q_ids, g_ids = [], []
    for q in queries:
        same = [
            r["image_id"]
            for r in rows
            if r["identity"] == q["identity"] and r["image_id"] != q["image_id"]
        ]
        other = [r["image_id"] for r in rows if r["identity"] != q["identity"]]
        chosen = (same + other)[:per_query]
        q_ids += [q["image_id"]] * len(chosen)
        g_ids += chosen
    return pa.table({"query_id": q_ids, "gallery_id": g_ids})


def _read_parts(out):
    files = sorted((out / "pairs").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pandas() if files else None


@pytest.mark.slow
def test_lightglue_through_the_actor_pool_on_real_files(ray_cluster, zoo, tmp_path):
    cfg = RerankConfig(
        extractor="aliked",
        matcher="lightglue",
        max_keypoints=96,
        resize_long_side=160,
        queries_per_batch=2,
        batch_size=4,
    )
    rows = _rows(zoo)
    queries = [rows[0], rows[4], rows[8]]
    pairs = _pairs_for(zoo, queries, per_query=5)
    result = score_pairs_detailed(pairs, zoo, cfg, str(tmp_path / "scores"))
    df = result.table.to_pandas()
    assert len(df) == 15 and df["local_score"].notna().all() and result.errors.num_rows == 0
    assert result.stats["pairs_matched"] == 15 and result.stats["actors"] >= 1
    assert result.stats["images_extracted"] == len(set(df["query_id"]) | set(df["gallery_id"]))
    ident = {r["image_id"]: (r["identity"], r["viewpoint"]) for r in rows}
    same_view = df[
        [ident[q] == ident[g] for q, g in zip(df["query_id"], df["gallery_id"], strict=True)]
    ]
    other = df[
        [ident[q][0] != ident[g][0] for q, g in zip(df["query_id"], df["gallery_id"], strict=True)]
    ]
    assert len(same_view) >= 1 and len(other) >= 6
    assert same_view["local_score"].min() > other["local_score"].median()
    # features were extracted once per image and written to the cache
    cached = list((tmp_path / "scores" / "features").rglob("*.npz"))
    assert len(cached) == result.stats["images_extracted"]


@pytest.mark.slow
def test_resume_skips_finished_queries_without_duplicates(ray_cluster, zoo, tmp_path):
    cfg = RerankConfig(**SIFT, queries_per_batch=1, cache_dir=str(tmp_path / "features"))
    rows = _rows(zoo)
    pairs = _pairs_for(zoo, rows[0:16:4], per_query=4)  # 4 queries x 4 candidates
    first_two = pairs.slice(0, 8)
    out = tmp_path / "scores"
    r1 = score_pairs_detailed(first_two, zoo, cfg, str(out))
    assert r1.stats["pairs_matched"] == 8
    r2 = score_pairs_detailed(pairs, zoo, cfg, str(out))  # the "interrupted" run, resumed
    assert r2.stats["pairs_matched"] == 8 and r2.stats["queries_resumed"] == 2
    r3 = score_pairs_detailed(pairs, zoo, cfg, str(out))
    assert r3.stats["pairs_matched"] == 0 and r3.stats["queries_resumed"] == 4
    stored = _read_parts(out)
    assert len(stored) == 16 and not stored.duplicated(["query_id", "gallery_id"]).any()
    # the resumed result equals one fresh run
    fresh = score_pairs(pairs, zoo, cfg, str(tmp_path / "fresh"))
    np.testing.assert_array_equal(
        r3.table["local_score"].to_numpy(), fresh["local_score"].to_numpy()
    )
    # other settings in the same folder: refused, unless overwritten
    with pytest.raises(OutputError, match="other settings"):
        score_pairs(pairs, zoo, cfg.replace(max_keypoints=100), str(out))
    r4 = score_pairs_detailed(pairs, zoo, cfg.replace(max_keypoints=100), str(out), overwrite=True)
    assert r4.stats["pairs_matched"] == 16


@pytest.mark.slow
def test_bad_images_get_null_scores_and_error_rows(ray_cluster, zoo, tmp_path):
    from reid_ray.data import Manifest

    rows = _rows(zoo)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    extra = [
        dict(rows[0], image_id="corrupt", path=str(tmp_path / "corrupt.jpg")),
        dict(rows[0], image_id="gone", path=str(tmp_path / "gone.jpg")),
    ]
    table = pa.Table.from_pylist(rows + extra, schema=zoo.table.schema)
    manifest = Manifest(table)
    q = rows[0]["image_id"]
    pairs = pa.table(
        {
            "query_id": [q, q, q, "gone", "not-in-manifest"],
            "gallery_id": [rows[1]["image_id"], "corrupt", "gone", q, q],
        }
    )
    cfg = RerankConfig(**SIFT)
    result = score_pairs_detailed(pairs, manifest, cfg, str(tmp_path / "scores"))
    scores = result.table["local_score"].to_pylist()
    assert scores[0] is not None and scores[1:] == [None] * 4
    errors = {r["image_id"]: r for r in result.errors.to_pylist()}
    assert set(errors) == {"corrupt", "gone", "not-in-manifest"}
    assert "missing file" in errors["gone"]["reason"] and errors["gone"]["path"].endswith(
        "gone.jpg"
    )
    assert "not an image" in errors["corrupt"]["reason"] or "corrupt" in errors["corrupt"]["reason"]
    assert errors["not-in-manifest"]["stage"] == "rerank-manifest"
    assert result.stats["pairs_without_score"] == 4 and result.stats["errors"] == 3
    # a rerun reports the same errors and does not match the good pair again
    again = score_pairs_detailed(pairs, manifest, cfg, str(tmp_path / "scores"))
    assert again.stats["pairs_matched"] == 0 and again.errors.num_rows == 3


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
            order = np.argsort(-score, kind="stable")
            for rank, k in enumerate(order):
                out["query_id"].append(q["image_id"])
                out["gallery_id"].append(cands[k]["image_id"])
                out["score"].append(float(score[k]))
                out["rank"].append(rank)
        return pa.table(out)

    return candidates(queries, gallery, False), candidates(gallery, gallery, True)


def _top1(table, manifest, rank_col):
    ident = {r["image_id"]: r["identity"] for r in _rows(manifest)}
    df = table.to_pandas().sort_values(["query_id", rank_col]).drop_duplicates("query_id")
    return float(
        np.mean(
            [ident[q] == ident[g] for q, g in zip(df["query_id"], df["gallery_id"], strict=True)]
        )
    )


@pytest.mark.slow
def test_calibrated_fusion_lifts_a_weak_global_model_and_keeps_a_strong_one(
    ray_cluster, zoo, tmp_path
):
    cfg = RerankConfig(**SIFT, calibration_top_k=30, calibration_queries=50, queries_per_batch=4)
    for quality in ("weak", "strong"):
        qc, gc = _query_gallery_candidates(zoo, quality)
        reranked, fusion, info = rerank_with_calibration(qc, gc, zoo, cfg, str(tmp_path / quality))
        global_top1 = _top1(qc, zoo, "rank")
        fused_top1 = _top1(reranked, zoo, "new_rank")
        assert info["calibration_same_pairs"] > 0 and (tmp_path / quality / "fusion.json").exists()
        p = reranked["probability"].to_numpy()
        assert np.all((p >= 0) & (p <= 1))
        if quality == "weak":
            assert fused_top1 >= global_top1 + 0.4, (global_top1, fused_top1)
            assert fusion.weight > 0
        else:
            assert global_top1 == 1.0 and fused_top1 >= global_top1
        preds = top_predictions(reranked, zoo, fusion).to_pylist()
        assert len(preds) == 8 and all(0 <= r["probability"] <= 1 for r in preds)
        # known queries with a correct top match are mostly called known
        assert np.mean([not r["is_new"] for r in preds]) >= 0.5


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
    assert (
        summary["reranked"] and summary["counts"]["pairs"] > 0 and summary["counts"]["errors"] == 0
    )
    assert summary["throughput"]["pairs_per_s"] > 0
    assert pq.read_table(out / "reranked" / "part-00000.parquet").num_rows == qc.num_rows
    assert pq.read_table(out / "predictions" / "part-00000.parquet").num_rows == 8
    assert (out / "fusion.json").exists() and len(list((out / "viz").glob("*.jpg"))) == 2
    assert "pairs/s" in res.output
    bad = CliRunner().invoke(app, args[:6] + ["--extractor", "orb"])
    assert bad.exit_code == 2 and "extractor must be one of" in bad.output
