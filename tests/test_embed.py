"""Embedding: the resource plan, the Embedder kernel (no Ray), the on-disk store, and the
Ray pipeline on real toy-zoo JPEGs with bad files, resume after a real kill, S3 in and out.

Tiny model and images (resnet18 at 32-128 px): the machine has 2 shared cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from reid_ray import io as rio
from reid_ray.data.manifest import errors_table
from reid_ray.embed import (
    EmbedConfig,
    embeddings_table,
    load_embed_config,
    plan_resources,
    read_embeddings,
    read_errors,
    scan_existing,
)
from reid_ray.embed.store import (
    EMBEDDINGS_DIR,
    iter_embedding_batches,
    write_batch_parts,
    write_errors,
)
from reid_ray.errors import ConfigError, OutputError
from reid_ray.parts import list_parts, read_part, remove_temporary
from reid_ray.runtime import ClusterView

MODEL = "timm-random:resnet18"
SIZE = 32


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from reid_ray.synth import generate_zoo

    out = tmp_path_factory.mktemp("zoo")
    generate_zoo(str(out), species=2, individuals=6, images_per=4, size=64, seed=0)
    return out


def _bad_manifest(zoo_dir, name="with_bad.csv"):
    """The zoo's manifest plus four unreadable images and two rows the manifest rejects."""
    meta = pd.read_csv(zoo_dir / "metadata.csv", dtype=str, keep_default_na=False)
    good = meta.iloc[0]
    data = (zoo_dir / good["path"]).read_bytes()
    bad_dir = zoo_dir / "bad"
    bad_dir.mkdir(exist_ok=True)
    (bad_dir / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad_dir / "zero.jpg").write_bytes(b"")
    (bad_dir / "text.jpg").write_text("not a picture\n")
    rows = [
        ("bad-truncated", "bad/truncated.jpg", ""),
        ("bad-zero", "bad/zero.jpg", ""),
        ("bad-text", "bad/text.jpg", ""),
        ("bad-missing", "bad/does_not_exist.jpg", ""),
        (good["image_id"], good["path"], ""),  # duplicate image_id: rejected by the manifest
        ("bad-bbox", good["path"], "1,2,-5,4"),  # negative width: rejected by the manifest
    ]
    extra = pd.DataFrame(
        [{"image_id": i, "path": p, "identity": "x", "bbox": b} for i, p, b in rows]
    )
    path = zoo_dir / name
    pd.concat([meta, extra], ignore_index=True).to_csv(path, index=False)
    return path, meta["image_id"].tolist()


BAD_REASONS = {
    "bad-truncated": "corrupt|truncated",
    "bad-zero": "empty file",
    "bad-text": "not an image",
    "bad-missing": "missing file",
}


@pytest.fixture(scope="module")
def embedder():
    from reid_ray.embed import Embedder

    return Embedder(MODEL, image_size=SIZE, threads=1)


def _decoded(manifest_path, preprocess):
    """Manifest rows decoded the way the pipeline's CPU tasks decode them for a model."""
    from reid_ray.data import read_manifest
    from reid_ray.data.pipeline import load_batch

    table = read_manifest(str(manifest_path)).table
    batch = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in table.column_names}
    return load_batch(
        batch,
        size=preprocess.input_size,
        resize_mode=preprocess.resize_mode,
        interpolation=preprocess.interpolation,
    )


# --- the resource plan ------------------------------------------------------------------


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_plan_leaves_cpu_for_decode(cpus):
    plan = plan_resources(EmbedConfig(), ClusterView(cpus, 0))
    assert plan.device == "cpu" and plan.precision == "fp32" and plan.gpus_per_actor == 0
    assert plan.actors >= 1 and plan.threads >= 1 and plan.batch_size >= 1
    # the inference actors never take every CPU: decode tasks must be schedulable
    assert plan.actors * plan.cpus_per_actor + plan.decode_cpus <= cpus
    assert plan.decode_tasks >= 1
    free = cpus - plan.actors * plan.cpus_per_actor
    assert plan.decode_tasks * plan.decode_cpus <= free + 1e-9
    assert plan.threads >= int(plan.cpus_per_actor)


def test_two_core_plan_is_the_measured_default():
    """benchmarks/results/embed_throughput.json: 1 actor on 1.5 CPUs with 2 threads,
    decoders on 0.25 CPU."""
    plan = plan_resources(EmbedConfig(), ClusterView(2, 0))
    assert (plan.actors, plan.cpus_per_actor, plan.threads) == (1, 1.5, 2)
    assert (plan.decode_cpus, plan.decode_tasks, plan.batch_size) == (0.25, 2, 32)


def test_sixteen_core_plan_one_actor_per_eight_cpus():
    plan = plan_resources(EmbedConfig(), ClusterView(16, 0))
    assert (plan.actors, plan.cpus_per_actor, plan.threads, plan.decode_cpus) == (2, 6, 6, 1)
    assert plan.decode_tasks == 4  # the 4 CPUs the actors leave


def test_gpu_plan_one_actor_per_gpu_half_precision():
    plan = plan_resources(EmbedConfig(), ClusterView(32, 4))
    assert (plan.device, plan.precision, plan.actors, plan.gpus_per_actor) == ("cuda", "fp16", 4, 1)
    assert plan.batch_size == 128 and not plan.waits_for_gpus
    assert plan_resources(EmbedConfig(precision="fp32"), ClusterView(32, 4)).precision == "fp32"
    assert plan_resources(EmbedConfig(device="cpu"), ClusterView(32, 4)).device == "cpu"


def test_explicit_gpu_request_waits_for_gpu_nodes():
    """An autoscaling cluster starts without GPU nodes: device cuda must ask for GPUs (the
    autoscaler adds them), never fall back to CPU."""
    plan = plan_resources(EmbedConfig(device="cuda"), ClusterView(8, 0))
    assert (plan.device, plan.gpus_per_actor, plan.precision) == ("cuda", 1.0, "fp16")
    assert plan.waits_for_gpus and plan.actors == 1
    plan = plan_resources(EmbedConfig(device="cuda", actors=3), ClusterView(2, 1))
    assert plan.actors == 3 and plan.waits_for_gpus


def test_plan_overrides_and_invalid_settings():
    plan = plan_resources(
        EmbedConfig(actors=2, cpus_per_actor=0.5, threads=3, batch_size=7), ClusterView(4, 0)
    )
    assert (plan.actors, plan.cpus_per_actor, plan.threads, plan.batch_size) == (2, 0.5, 3, 7)
    with pytest.raises(ConfigError, match="fp16"):
        plan_resources(EmbedConfig(precision="fp16"), ClusterView(8, 0))
    with pytest.raises(ConfigError, match="decoders"):
        plan_resources(EmbedConfig(cpus_per_actor=2), ClusterView(2, 0))
    with pytest.raises(ConfigError, match="batch_size"):
        EmbedConfig(batch_size=-1)
    with pytest.raises(ConfigError, match="device"):
        EmbedConfig(device="tpu")
    with pytest.raises(ConfigError, match="decode_mode"):
        EmbedConfig(decode_mode="threads")
    with pytest.raises(ConfigError, match="batchsize.*valid.*batch_size"):
        load_embed_config({"batchsize": 3})
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        load_embed_config({"batch_size": "many"})


def test_embed_config_from_file_section_and_overrides(tmp_path):
    path = tmp_path / "embed.yaml"
    path.write_text("embed:\n  batch_size: 16\n  flip: true\n")
    cfg = load_embed_config(str(path), ["device=cpu", "rows_per_part=64"])
    assert (cfg.batch_size, cfg.flip, cfg.device, cfg.rows_per_part) == (16, True, "cpu", 64)
    assert cfg.replace(batch_size=None, actors=2) == load_embed_config(
        str(path), {"device": "cpu", "rows_per_part": 64, "actors": 2}
    )


# --- the Embedder kernel (one process, no Ray) --------------------------------------------


def test_embedder_normalises_and_passes_errors_through(zoo, embedder):
    path, good_ids = _bad_manifest(zoo)
    batch = _decoded(path, embedder.preprocess)
    out = embedder(batch)
    errors = dict(zip(out["image_id"], out["error"], strict=True))
    stages = dict(zip(out["image_id"], out["stage"], strict=True))
    for image_id, pattern in BAD_REASONS.items():
        assert pd.Series([errors[image_id]]).str.contains(pattern).all(), errors[image_id]
        assert stages[image_id] == "decode"
    ok = out["error"] == ""
    assert ok.sum() == len(good_ids)
    emb = out["embedding"]
    assert emb.dtype == np.float32 and emb.shape == (len(out["image_id"]), embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(emb[ok], axis=1), 1.0, atol=1e-5)
    assert not emb[~ok].any()  # error rows carry no vector

    # the same as the model's own output, L2-normalised
    import torch

    with torch.inference_mode():
        x = embedder.preprocess.normalize(batch["image"][ok])
        ref = embedder.loaded.model(x).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb[ok], ref, atol=1e-5)
    # distinct images give distinct vectors
    assert len({tuple(np.round(v, 4)) for v in emb[ok]}) == ok.sum()


def test_embedder_is_deterministic_across_instances(zoo, embedder):
    from reid_ray.embed import Embedder

    batch = _decoded(zoo / "metadata.csv", embedder.preprocess)
    other = Embedder(MODEL, image_size=SIZE, threads=1, expected_key=embedder.key)
    assert other.key == embedder.key
    np.testing.assert_allclose(other(batch)["embedding"], embedder(batch)["embedding"], atol=1e-6)


def test_flip_tta_is_mirror_invariant(zoo, embedder):
    from reid_ray.embed import Embedder

    batch = _decoded(zoo / "metadata.csv", embedder.preprocess)
    mirrored = dict(batch, image=np.ascontiguousarray(batch["image"][:, :, ::-1]))
    flip = Embedder(MODEL, image_size=SIZE, threads=1, flip=True)
    assert flip.key == embedder.key + "+flip"
    a, b = flip(batch)["embedding"], flip(mirrored)["embedding"]
    np.testing.assert_allclose(a, b, atol=1e-5)  # f(x) + f(mirror x) does not see the mirror
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    plain_a, plain_b = embedder(batch)["embedding"], embedder(mirrored)["embedding"]
    assert np.abs(plain_a - plain_b).max() > 1e-3  # without TTA the mirror changes the vector


def test_embedder_refuses_a_different_model():
    from reid_ray.embed import Embedder
    from reid_ray.errors import ModelError

    with pytest.raises(ModelError, match="fingerprint"):
        Embedder(MODEL, image_size=SIZE, expected_key="0000000000000000")


# --- the store ------------------------------------------------------------------------------


def test_batch_parts_store_round_trip(tmp_path):
    out = str(tmp_path / "out")
    rng = np.random.default_rng(0)
    ids = [f"i{n}" for n in range(12)]
    vecs = rng.normal(size=(12, 8)).astype(np.float32)
    totals = [0, 0]
    for start in range(0, 12, 4):
        stop = start + 4
        errors = np.array(["", "", "", "boom" if start == 4 else ""], dtype=object)
        n_ok, n_bad, rows = write_batch_parts(
            out,
            "key-a",
            dict(
                image_id=np.array(ids[start:stop], dtype=object),
                path=np.array([f"p{n}" for n in range(start, stop)], dtype=object),
                embedding=vecs[start:stop],
                error=errors,
                stage=np.where(errors == "", "", "decode").astype(object),
            ),
        )
        totals[0] += n_ok
        totals[1] += n_bad
    assert totals == [11, 1] and rows == []
    assert len(list_parts(str(tmp_path / "out" / EMBEDDINGS_DIR))) == 3
    write_errors(out, errors_table([dict(image_id="m", path="x", stage="manifest", reason="dup")]))
    # a temporary file of a killed writer is never read as a part
    (tmp_path / "out" / EMBEDDINGS_DIR / "part-x.parquet.tmp-1234").write_bytes(b"PAR1 half")
    existing = scan_existing(out)
    assert existing.keys == {"key-a"} and existing.ids("key-a") == set(ids) - {"i7"}
    emb = read_embeddings(out, ids=["i11", "i0", "i7", "i3"])
    assert emb.ids.tolist() == ["i11", "i0", "i3"] and emb.key == "key-a"
    np.testing.assert_array_equal(emb.matrix, vecs[[11, 0, 3]])
    errors = sorted(read_errors(out).to_pylist(), key=lambda r: r["image_id"])
    assert errors == [
        {"image_id": "i7", "path": "p7", "stage": "decode", "reason": "boom"},
        {"image_id": "m", "path": "x", "stage": "manifest", "reason": "dup"},
    ]
    streamed = sum(b.num_rows for b in iter_embedding_batches(out, batch_size=4))
    assert streamed == 11
    assert remove_temporary(str(tmp_path / "out" / EMBEDDINGS_DIR)) == 1


def test_read_embeddings_refuses_mixed_models(tmp_path):
    out = str(tmp_path / "out")
    vec = np.ones((1, 4), np.float32)
    rio.write_table_atomic(
        rio.join(out, EMBEDDINGS_DIR, "part-a.parquet"), embeddings_table(["a"], vec, "k1")
    )
    rio.write_table_atomic(
        rio.join(out, EMBEDDINGS_DIR, "part-b.parquet"), embeddings_table(["b"], vec, "k2")
    )
    with pytest.raises(OutputError, match="2 models"):
        read_embeddings(out)
    with pytest.raises(OutputError, match="no embeddings"):
        read_embeddings(str(tmp_path / "empty"))


# --- the Ray pipeline -----------------------------------------------------------------------


def _all_rows(out: str) -> pa.Table:
    parts = list_parts(rio.join(out, EMBEDDINGS_DIR))
    return pa.concat_tables([read_part(p) for p in parts])


@pytest.mark.slow
def test_pipeline_embeds_good_rows_and_records_bad_ones(ray_cluster, zoo, tmp_path, embedder):
    from reid_ray.embed import embed

    path, good_ids = _bad_manifest(zoo)
    out = str(tmp_path / "out")
    cfg = EmbedConfig(image_size=SIZE, rows_per_part=8, batch_size=8)
    summary = embed(str(path), MODEL, out, cfg)
    assert summary.n_embedded == len(good_ids) and summary.n_errors == 4
    assert summary.n_manifest_errors == 2 and summary.key == embedder.key

    rows = _all_rows(out)
    assert sorted(rows.column("image_id").to_pylist()) == sorted(good_ids)  # once each
    assert set(rows.column("model").to_pylist()) == {embedder.key}
    emb = read_embeddings(out, ids=good_ids)
    np.testing.assert_allclose(np.linalg.norm(emb.matrix, axis=1), 1.0, atol=1e-5)
    # the pipeline computes what the kernel computes in one process
    batch = _decoded(zoo / "metadata.csv", embedder.preprocess)
    direct = embedder(batch)
    np.testing.assert_allclose(emb.matrix, direct["embedding"], atol=1e-4)

    errors = read_errors(out).to_pandas().set_index("image_id")
    for image_id, pattern in BAD_REASONS.items():
        assert errors.loc[image_id, "stage"] == "decode"
        assert pd.Series([errors.loc[image_id, "reason"]]).str.contains(pattern).all()
    manifest_errors = errors[errors.stage == "manifest"]
    assert len(manifest_errors) == 2
    assert manifest_errors.reason.str.contains("duplicate image_id").sum() == 1

    info = rio.read_json(rio.join(out, "manifest.json"))
    assert info["counts"]["embedded"] == len(good_ids) and info["counts"]["errors"] == 4
    assert info["model"]["fingerprint"] == summary.fingerprint
    assert info["plan"]["actors"] >= 1 and info["timings"]["images_per_second"] > 0

    # rerun (decoding in Ray tasks this time): nothing embedded twice, the bad rows are
    # tried again and still counted
    again = embed(str(path), MODEL, out, cfg.replace(decode_mode="tasks"))
    assert again.n_embedded == 0 and again.n_already_embedded == len(good_ids)
    assert again.n_errors == 4
    rows = _all_rows(out)
    assert rows.num_rows == len(good_ids) and sorted(rows.column("image_id").to_pylist()) == sorted(
        good_ids
    )
    assert read_errors(out).num_rows == 6  # not accumulated across runs

    # another model in the same folder: refused, unless --overwrite
    with pytest.raises(OutputError, match="another model"):
        embed(str(path), MODEL, out, cfg.replace(flip=True))
    flipped = embed(str(path), MODEL, out, cfg.replace(flip=True), overwrite=True)
    assert flipped.n_embedded == len(good_ids)
    assert set(_all_rows(out).column("model").to_pylist()) == {embedder.key + "+flip"}


_KILL_SCRIPT = """
import sys
from reid_ray.embed import EmbedConfig
from reid_ray.embed.pipeline import embed
embed(sys.argv[1], sys.argv[2], sys.argv[3],
      EmbedConfig(image_size=int(sys.argv[4]), rows_per_part=8, batch_size=8))
"""


@pytest.mark.slow
def test_resume_after_the_job_is_killed(ray_cluster, tmp_path):
    """Kill a real embed job (its own driver process) once parts exist; the rerun embeds
    exactly the missing rows: nothing duplicated, nothing lost."""
    from reid_ray.embed import embed
    from reid_ray.synth import generate_zoo

    zoo_dir = tmp_path / "zoo"
    # 120 images in parts of 8: the kill lands after 3 of 15 parts, the rerun embeds the rest
    generate_zoo(str(zoo_dir), species=2, individuals=12, images_per=10, size=64, seed=1)
    manifest = str(zoo_dir / "metadata.csv")
    all_ids = set(pd.read_csv(manifest, dtype=str)["image_id"])
    out = str(tmp_path / "out")
    size = 96
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, manifest, MODEL, out, str(size)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list_parts(rio.join(out, EMBEDDINGS_DIR))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"job ended before it could be killed: {proc.stderr.read()!r}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    assert not rio.exists(rio.join(out, "manifest.json"))  # not complete-looking
    first = scan_existing(out)
    (key,) = first.keys
    done_before = first.ids(key)
    assert 0 < len(done_before) < len(all_ids)
    # what a writer killed mid-part leaves behind: must be ignored, then cleaned up
    leftover = tmp_path / "out" / EMBEDDINGS_DIR / "part-killed-00009.parquet.tmp-dead"
    leftover.write_bytes(b"PAR1 half a part")

    summary = embed(manifest, MODEL, out, EmbedConfig(image_size=size, rows_per_part=64))
    assert summary.n_already_embedded == len(done_before)
    assert summary.n_embedded == len(all_ids) - len(done_before)
    rows = _all_rows(out)
    ids = rows.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(all_ids) and set(ids) == all_ids
    assert not leftover.exists()
    assert rio.read_json(rio.join(out, "manifest.json"))["counts"]["total_embedded"] == len(all_ids)


@pytest.mark.slow
def test_s3_input_and_output(ray_cluster, zoo, s3_bucket, embedder):
    """Manifest and images on an S3 server, embeddings written back to S3, rerun resumes."""
    from reid_ray.embed import embed

    fs, _ = rio.filesystem(s3_bucket)
    fs.put(str(zoo / "images"), s3_bucket[5:] + "/zoo/images", recursive=True)
    fs.put(str(zoo / "metadata.csv"), s3_bucket[5:] + "/zoo/metadata.csv")
    good_ids = pd.read_csv(zoo / "metadata.csv", dtype=str)["image_id"].tolist()
    out = f"{s3_bucket}/out"
    cfg = EmbedConfig(image_size=SIZE, rows_per_part=10)
    summary = embed(f"{s3_bucket}/zoo/metadata.csv", MODEL, out, cfg)
    assert summary.n_embedded == len(good_ids) and summary.n_errors == 0
    emb = read_embeddings(out, ids=good_ids)
    assert emb.ids.tolist() == good_ids and emb.key == embedder.key
    direct = embedder(_decoded(zoo / "metadata.csv", embedder.preprocess))
    np.testing.assert_allclose(emb.matrix, direct["embedding"], atol=1e-4)
    assert rio.read_json(f"{out}/manifest.json")["counts"]["embedded"] == len(good_ids)
    again = embed(f"{s3_bucket}/zoo/metadata.csv", MODEL, out, cfg)
    assert again.n_embedded == 0 and again.n_already_embedded == len(good_ids)
