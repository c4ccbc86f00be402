"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``), storage on S3 (moto):
embedding, re-ranking and training give the results of one process; training places its
two workers on different nodes; a local output folder is refused.

Actors ask for 1.5 CPUs on nodes of 2, so no two fit on one node: the pools are spread
over the nodes by construction, not by the scheduler's mood. The module starts and stops
its own cluster; when the session's single-node cluster (``conftest.ray_cluster``) is
already up, it is stopped first and started again afterwards, with the same settings, so
the modules that run later find it as they expect.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pytest
from conftest import session_cluster_args

from reid_ray.data import read_manifest
from reid_ray.errors import OutputError

pytestmark = pytest.mark.slow

MODEL = "timm-random:resnet18"
SIZE = 32
NODES = 3
NODE_CPUS = 2
SPREAD_CPUS = 1.5  # per actor / worker: one per node
SIFT = dict(extractor="sift", matcher="classical", max_keypoints=200, resize_long_side=224)


def _add_node(c, tries: int = 3, **args):
    """``c.add_node`` on 127.0.0.1, retried: Ray waits only 30 s for a raylet to register,
    which a heavily loaded machine can miss."""
    for attempt in range(tries):
        try:
            return c.add_node(node_ip_address="127.0.0.1", **args)
        except Exception as e:  # Ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(e) or attempt == tries - 1:
                raise


def _forget_address(address: str | None) -> None:
    """Remove the machine-wide "current cluster" file that ``Cluster`` writes
    (``/tmp/ray/ray_current_cluster``): while it names this cluster, every ``ray.init()``
    without an address on the machine (other test sessions, jobs) joins it instead of
    starting its own, and once the cluster is gone they try to join a dead one."""
    from ray._private.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            if address and f.read().strip() == address:
                os.remove(path)
    except FileNotFoundError:
        pass


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Three 2-CPU nodes on 127.0.0.1 (each with a small object store), the driver joined."""
    import ray
    from ray.cluster_utils import Cluster

    from reid_ray.runtime import configure_data_context, init_ray

    had_session_cluster = ray.is_initialized()
    if had_session_cluster:
        ray.shutdown()
    node = dict(num_cpus=NODE_CPUS, object_store_memory=150 * 1024 * 1024)
    c = Cluster()
    try:
        _add_node(
            c,
            include_dashboard=False,
            temp_dir=tempfile.mkdtemp(prefix="rr-mn-", dir="/tmp"),
            **node,
        )
        _forget_address(c.address)
        for _ in range(NODES - 1):
            _add_node(c, **node)
        c.wait_for_nodes()
        init_ray(c.address)
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) >= NODES
        assert {n["NodeManagerAddress"] for n in alive} == {"127.0.0.1"}
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        _forget_address(c.address)
        if had_session_cluster:
            ray.init(**session_cluster_args())
            configure_data_context()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, s3_server):
    """A tiny toy zoo on local disk and the same files on S3: (local manifest, s3 root)."""
    from reid_ray import io as rio
    from reid_ray.synth import generate_zoo

    local = tmp_path_factory.mktemp("mn-zoo")
    generate_zoo(str(local), species=2, individuals=6, images_per=4, size=96, seed=5)
    fs, _ = rio.filesystem("s3://rr-multinode")
    fs.mkdir("rr-multinode")
    fs.put(str(local / "images"), "rr-multinode/zoo/images", recursive=True)
    fs.put(str(local / "metadata.csv"), "rr-multinode/zoo/metadata.csv")
    fs.put(str(local / "split.csv"), "rr-multinode/zoo/split.csv")
    return {"local": local, "s3": "s3://rr-multinode"}


def _nodes_of(class_fragment: str) -> set[str]:
    """Node ids of the actors (alive or finished) whose class name contains the fragment."""
    from ray._private import state

    return {
        a["Address"]["NodeID"]
        for a in state.actors().values()
        if class_fragment in a.get("ActorClassName", "") and a.get("Address", {}).get("NodeID")
    }


def test_local_output_is_refused_and_s3_accepted(cluster, zoo, tmp_path):
    from reid_ray.embed import EmbedConfig, embed
    from reid_ray.runtime import require_shared_output

    local = str(tmp_path / "out")
    with pytest.raises(OutputError, match=f"{NODES} nodes.*s3://|REID_RAY_SHARED_FS"):
        require_shared_output(local)
    require_shared_output(f"{zoo['s3']}/anything")  # shared storage: accepted
    # a stage refuses before its workers write where the others cannot read
    with pytest.raises(OutputError, match="local folder"):
        embed(str(zoo["local"] / "metadata.csv"), MODEL, local, EmbedConfig(image_size=SIZE))


def test_embed_on_several_nodes_equals_one_process(cluster, zoo):
    from reid_ray.data.pipeline import load_batch
    from reid_ray.embed import EmbedConfig, Embedder, embed, read_embeddings

    out = f"{zoo['s3']}/embed"
    cfg = EmbedConfig(
        image_size=SIZE,
        actors=2,
        cpus_per_actor=SPREAD_CPUS,
        decode_tasks=2,
        rows_per_part=8,
        batch_size=8,
        device="cpu",
    )
    summary = embed(f"{zoo['s3']}/zoo/metadata.csv", MODEL, out, cfg)
    table = read_manifest(str(zoo["local"] / "metadata.csv")).table
    ids = table["image_id"].to_pylist()
    assert summary.n_embedded == len(ids) and summary.n_errors == 0
    assert len(_nodes_of("Embedder")) == 2  # one actor per node

    embedder = Embedder(MODEL, image_size=SIZE, threads=1)
    batch = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in table.column_names}
    p = embedder.preprocess
    direct = embedder(
        load_batch(
            batch, size=p.input_size, resize_mode=p.resize_mode, interpolation=p.interpolation
        )
    )
    emb = read_embeddings(out, ids=ids)
    assert emb.ids.tolist() == ids and emb.key == embedder.key
    np.testing.assert_allclose(emb.matrix, direct["embedding"], atol=1e-4)


def test_rerank_on_several_nodes_scores_as_one_process(cluster, zoo):
    from reid_ray.rerank import RerankConfig, rerank_candidates
    from reid_ray.rerank.features import build_extractor, load_prepared
    from reid_ray.rerank.fusion import fit_fusion
    from reid_ray.rerank.matchers import PairScorer

    manifest = read_manifest(f"{zoo['s3']}/zoo/metadata.csv")
    rows = manifest.table.to_pylist()
    queries, gallery = rows[:6], rows[6:]
    cands = pa.table(
        {
            "query_id": [q["image_id"] for q in queries for _ in range(4)],
            "gallery_id": [
                gallery[(i * 3 + j) % len(gallery)]["image_id"] for i in range(6) for j in range(4)
            ],
            "score": [0.9, 0.7, 0.5, 0.3] * 6,
        }
    )
    cfg = RerankConfig(**SIFT, actors=2, cpus_per_actor=SPREAD_CPUS, device="cpu", top_k=4)
    rng = np.random.default_rng(0)
    same = rng.random(200) < 0.2
    fusion = fit_fusion(rng.random(200) + same, rng.uniform(0, 30, 200) + 40 * same, same)
    result = rerank_candidates(cands, manifest, cfg, f"{zoo['s3']}/rerank", fusion=fusion)
    assert result.errors.num_rows == 0
    got = {(r["query_id"], r["gallery_id"]): r["local_score"] for r in result.ranked.to_pylist()}
    assert len(got) == cands.num_rows and all(v is not None for v in got.values())

    # the same pairs in this process, from the local copies of the images
    local_rows = {
        r["image_id"]: r
        for r in read_manifest(str(zoo["local"] / "metadata.csv")).table.to_pylist()
    }
    extractor, scorer = build_extractor(cfg), PairScorer(cfg)
    feats = {}
    for i in set(cands["query_id"].to_pylist()) | set(cands["gallery_id"].to_pylist()):
        feats[i] = extractor.extract(*load_prepared(local_rows[i], cfg))
    for (q, g), value in got.items():
        ((want, _),) = scorer.score(feats[q], [feats[g]])
        assert value == pytest.approx(want, abs=1e-6), (q, g)
    assert any(v > 0 for v in got.values())  # real matches, not all-empty features


def test_two_training_workers_on_two_nodes(cluster, zoo):
    from reid_ray.models import load
    from reid_ray.train import TrainConfig, train

    before = _nodes_of("RayTrainWorker")
    cfg = TrainConfig(
        model=MODEL,
        image_size=SIZE,
        embedding_dim=16,
        batch_size=8,
        epochs=1,
        workers=2,
        cpus_per_worker=SPREAD_CPUS,
        calibration_fraction=0.0,
        decoded_cache_mb=0,
    )
    out = f"{zoo['s3']}/train"
    # every labelled row trains (48 images: 3 batches per worker); no validation split
    summary = train(f"{zoo['s3']}/zoo/metadata.csv", out, config=cfg)
    assert summary["epochs_completed"] == 1
    assert all(np.isfinite(v) for v in summary["train_loss"])
    assert len(_nodes_of("RayTrainWorker") - before) == 2  # one worker per node
    loaded = load(out)  # the checkpoint on S3 is a model
    assert loaded.embedding_dim == 16
