"""FAISS retrieval: exact search equals brute force, IVF recall, save/load (local and S3),
candidates Parquet, and the index/search jobs over an embed output folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reid_ray import io as rio
from reid_ray.embed.store import EMBEDDINGS_DIR, embeddings_table
from reid_ray.errors import ConfigError, OutputError
from reid_ray.index import (
    CANDIDATES_SCHEMA,
    build_index,
    candidates_table,
    candidates_to_matrix,
    index_embeddings,
    load_index,
    read_candidates,
    save_index,
    search,
    search_embeddings,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(gallery: np.ndarray, queries: np.ndarray, k: int):
    sim = queries @ gallery.T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), order


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    gallery = _unit(rng.normal(size=(300, 24)))
    queries = _unit(rng.normal(size=(40, 24)))
    ids = np.array([f"g{i:03d}" for i in range(len(gallery))], dtype=object)
    return gallery, queries, ids


def test_exact_search_equals_brute_force(data):
    gallery, queries, ids = data
    index = build_index(gallery, ids)
    assert index.kind == "flat" and len(index) == 300
    scores, found = search(index, queries, k=10)
    want_scores, want_pos = _brute_force(gallery, queries, 10)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert (found == ids[want_pos]).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_k_larger_than_gallery_is_padded(data):
    gallery, queries, ids = data
    index = build_index(gallery[:3], ids[:3])
    scores, found = search(index, queries[:2], k=5)
    assert scores.shape == (2, 5) and found.shape == (2, 5)
    assert np.isfinite(scores[:, :3]).all() and np.isneginf(scores[:, 3:]).all()
    assert all(g is None for g in found[:, 3:].ravel())
    assert set(found[0, :3]) == set(ids[:3])


def test_exclude_self_is_leave_one_out(data):
    gallery, _, ids = data
    index = build_index(gallery, ids)
    scores, found = search(index, gallery, k=5, query_ids=ids, exclude_self=True)
    assert not (found == ids[:, None]).any()
    sim = gallery @ gallery.T
    np.fill_diagonal(sim, -np.inf)
    want = np.sort(sim, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="query_ids"):
        search(index, gallery, k=5, exclude_self=True)


def test_ivf_above_threshold_has_high_recall():
    # embeddings cluster by individual, as re-ID embeddings do: 400 centres, 40 each
    rng = np.random.default_rng(1)
    centres = _unit(rng.normal(size=(400, 32)))
    gallery = _unit(np.repeat(centres, 40, axis=0) + 0.15 * rng.normal(size=(16000, 32)))
    queries = _unit(centres[:200] + 0.15 * rng.normal(size=(200, 32)))
    ids = np.array([str(i) for i in range(len(gallery))], dtype=object)
    index = build_index(gallery, ids, exact_threshold=1000)
    assert index.kind == "ivf" and index.nlist > 1 and 1 <= index.nprobe <= index.nlist
    _, found = search(index, queries, k=10)
    _, want_pos = _brute_force(gallery, queries, 10)
    recall = np.mean([len(set(f) & set(ids[w])) / 10 for f, w in zip(found, want_pos, strict=True)])
    assert recall >= 0.95, recall


def test_bad_inputs_fail_clearly(data):
    gallery, queries, ids = data
    with pytest.raises(ConfigError, match="empty"):
        build_index(np.zeros((0, 24), np.float32), [])
    with pytest.raises(ConfigError, match="ids"):
        build_index(gallery, ids[:5])
    with pytest.raises(ConfigError, match="unique"):
        build_index(gallery[:2], ["a", "a"])
    index = build_index(gallery, ids)
    with pytest.raises(ConfigError, match="dimension"):
        search(index, queries[:, :10], k=3)
    with pytest.raises(ConfigError, match="k must be"):
        search(index, queries, k=0)


def test_empty_queries(data):
    gallery, _, ids = data
    scores, found = search(build_index(gallery, ids), np.zeros((0, 24), np.float32), k=4)
    assert scores.shape == (0, 4) and found.shape == (0, 4)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_load_round_trip(where, data, tmp_path, request):
    gallery, queries, ids = data
    folder = (
        str(tmp_path / "idx") if where == "local" else request.getfixturevalue("s3_bucket") + "/idx"
    )
    for kwargs in ({}, {"exact_threshold": 100, "nlist": 4, "nprobe": 2}):
        index = build_index(gallery, ids, key="fp123", **kwargs)
        save_index(index, folder, {"note": "x"})
        loaded = load_index(folder)
        assert loaded.kind == index.kind and loaded.key == "fp123" and loaded.nprobe == index.nprobe
        assert (loaded.ids == ids).all() and loaded.meta["note"] == "x"
        a = search(index, queries, k=7)
        b = search(loaded, queries, k=7)
        np.testing.assert_array_equal(a[0], b[0])
        assert (a[1] == b[1]).all()


def test_candidates_table_round_trip():
    scores = np.array([[0.9, 0.5, -np.inf], [0.8, 0.7, 0.1]], dtype=np.float32)
    ids = np.array([["a", "b", None], ["c", "a", "b"]], dtype=object)
    table = candidates_table(["q1", "q2"], scores, ids)
    assert table.schema == CANDIDATES_SCHEMA
    assert table.num_rows == 5  # padding not written
    assert table.column("rank").to_pylist() == [1, 2, 1, 2, 3]
    s2, i2 = candidates_to_matrix(table, ["q2", "q1", "q3"], k=3)
    np.testing.assert_array_equal(s2[0], scores[1])
    assert list(i2[1]) == ["a", "b", None] and all(g is None for g in i2[2])


def _write_embed_output(out: str, ids, matrix, key="fp-a", parts=3) -> None:
    chunks = np.array_split(np.arange(len(ids)), parts)
    for n, rows in enumerate(chunks):
        rio.write_table_atomic(
            rio.join(out, EMBEDDINGS_DIR, f"part-test-{n:05d}.parquet"),
            embeddings_table([ids[i] for i in rows], matrix[rows], key),
        )


def test_index_and_search_jobs_write_candidates(tmp_path):
    rng = np.random.default_rng(3)
    n = 60
    identity = [f"ind{i % 12}" for i in range(n)]
    ids = [f"img{i:03d}" for i in range(n)]
    centres = _unit(rng.normal(size=(12, 16)))
    matrix = _unit(centres[[i % 12 for i in range(n)]] + 0.05 * rng.normal(size=(n, 16)))
    emb_out = str(tmp_path / "emb")
    _write_embed_output(emb_out, ids, matrix)
    split = ["query" if i < 12 else "gallery" for i in range(n)]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image_id": ids, "path": [f"{i}.jpg" for i in ids], "identity": identity}).to_csv(
        manifest, index=False
    )
    split_file = tmp_path / "split.csv"
    pd.DataFrame({"image_id": ids, "split": split}).to_csv(split_file, index=False)

    idx = str(tmp_path / "index")
    summary = index_embeddings(emb_out, idx, manifest=str(manifest), split=str(split_file))
    assert summary.n == 48 and summary.kind == "flat" and summary.key == "fp-a"
    cand_out = str(tmp_path / "cand")
    s = search_embeddings(
        idx, emb_out, cand_out, manifest=str(manifest), split=str(split_file), k=5
    )
    assert s.n_queries == 12 and s.n_candidates == 60
    table = read_candidates(cand_out)
    assert set(table.column("query_id").to_pylist()) == set(ids[:12])
    gallery = set(ids[12:])
    assert set(table.column("gallery_id").to_pylist()) <= gallery
    top1 = table.to_pandas().query("rank == 1")
    assert len(top1) == 12
    ident = dict(zip(ids, identity, strict=True))
    # well-separated clusters: every query's best match is its own individual
    assert all(ident[q] == ident[g] for q, g in zip(top1.query_id, top1.gallery_id, strict=True))
    assert rio.exists(rio.join(cand_out, "manifest.json"))

    other = str(tmp_path / "emb_b")
    _write_embed_output(other, ids, matrix, key="fp-b", parts=1)
    with pytest.raises(ConfigError, match="different models"):
        search_embeddings(idx, other, str(tmp_path / "cand_b"), k=5)


def _sorted_candidates(out: str) -> pd.DataFrame:
    df = read_candidates(out).to_pandas()
    return df.sort_values(["query_id", "rank"]).reset_index(drop=True)


@pytest.mark.slow
def test_search_over_actors_equals_search_in_process(ray_cluster, tmp_path, s3_bucket):
    """An index built on a Ray worker, and query shards searched by an actor pool (an index
    replica each), reading and writing on S3, give exactly the in-process candidates; the
    driver only counts."""
    rng = np.random.default_rng(5)
    ids = [f"q{i:03d}" for i in range(90)]
    matrix = _unit(rng.normal(size=(90, 12)))
    emb_out = f"{s3_bucket}/emb"
    _write_embed_output(emb_out, ids, matrix, parts=4)
    idx = f"{s3_bucket}/index"
    # built by a Ray task: only the summary comes back to this process
    summary = index_embeddings(emb_out, idx, on_ray=True)
    assert (summary.n, summary.dim, summary.key) == (90, 12, "fp-a")
    # an error inside the task comes back as itself: one clear message, no remote traceback
    with pytest.raises(OutputError, match="no embeddings") as err:
        index_embeddings(str(tmp_path / "no-emb"), str(tmp_path / "no-idx"), on_ray=True)
    assert type(err.value) is OutputError
    local = search_embeddings(idx, emb_out, str(tmp_path / "local"), k=7, exclude_self=True)
    # the index built in this process gives the same candidates
    here = str(tmp_path / "index-here")
    index_embeddings(emb_out, here)
    search_embeddings(here, emb_out, str(tmp_path / "here"), k=7, exclude_self=True)
    pd.testing.assert_frame_equal(_sorted_candidates(str(tmp_path / "local")),
                                  _sorted_candidates(str(tmp_path / "here")))  # fmt: skip
    remote_out = f"{s3_bucket}/cand"
    spread = search_embeddings(
        idx, emb_out, remote_out, k=7, exclude_self=True, actors=2, batch_size=16
    )
    assert (spread.n_queries, spread.n_candidates) == (local.n_queries, local.n_candidates)
    assert spread.n_queries == 90 and spread.n_candidates == 90 * 7
    pd.testing.assert_frame_equal(_sorted_candidates(str(tmp_path / "local")),
                                  _sorted_candidates(remote_out))  # fmt: skip
    assert rio.read_json(f"{remote_out}/manifest.json")["actors"] == 2
    # 90 queries in shards of 16 rows: several parts, written by the actors
    assert len(rio.list_files(f"{remote_out}/candidates", ".parquet")) >= 4
