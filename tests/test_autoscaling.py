"""Ray's fake autoscaling cluster: a 2-CPU head and a GPU worker type with zero minimum.

Shows what a GPU job does on a cluster that starts with no GPU node: the shipped GPU
configs make the autoscaler add GPU nodes and put the embedding and LightGlue actors on
them; SIFT and classical matching plan CPU pools; an actor Ray gave no GPU sees none; and
local outputs and local image paths are refused while only the head is up (the cluster
can grow). The fake GPU nodes have no CUDA: ``REID_RAY_COMPUTE_DEVICE=cpu`` in the
cluster's environment makes the actors that hold a GPU compute on CPU (and say so).

The cluster is started here with ``ray start --head --block --autoscaling-config`` (what
``ray.cluster_utils.AutoscalingCluster`` does, without its ``ray stop --force``, which would
stop every Ray cluster on the machine) and stopped by killing its own process tree.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pytest
from conftest import session_cluster_args

from reid_ray.errors import ManifestError, OutputError

pytestmark = pytest.mark.slow

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "jobs" / "configs"
MODEL = "timm-random:resnet18"
GPU_NODES = 2  # the most the autoscaler may add; the test's pools need one
TINY_RERANK = dict(max_keypoints=64, resize_long_side=96, queries_per_batch=1, batch_size=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_cluster_config(port: int) -> dict:
    """Ray's ``fake_multi_node/example.yaml`` with a 2-CPU head and the GPU node type of
    the issue; the provider is pointed at this head (its default is port 6379)."""
    return {
        "cluster_name": "rr-autoscaling",
        "max_workers": GPU_NODES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu": {
                "resources": {"CPU": 2, "GPU": 1, "object_store_memory": 100 * 1024 * 1024},
                "node_config": {},
                "min_workers": 0,
                "max_workers": GPU_NODES,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 2,  # GPU nodes stay up between the test's stages
        "docker": {},
        **{
            k: []
            for k in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
            )
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


MARKER = "REID_RAY_AUTOSCALING_TEST"


def _stop_cluster(proc: subprocess.Popen, marker: str) -> None:
    """Stop ``proc`` (``ray start --block``) and every process of this cluster, by pid: its
    descendants, and those that carry ``MARKER=marker`` in their environment (a worker node
    whose start timed out leaves processes that were re-parented away from the tree)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARKER) == marker:
                family.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    alive = [p for p in {p.pid: p for p in family}.values() if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def autoscaling_cluster(s3_server):
    """The fake autoscaling cluster, the driver joined; only the head is up at first."""
    import ray

    from reid_ray.runtime import cluster_view, configure_data_context, init_ray

    had_session_cluster = ray.is_initialized()
    if had_session_cluster:
        ray.shutdown()
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="rr-as-", dir="/tmp")
    config = os.path.join(tmp, "cluster.json")
    with open(config, "w") as f:
        json.dump(_fake_cluster_config(port), f)
    env = dict(
        os.environ,  # with the S3 endpoint and keys: every node's workers reach moto
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        REID_RAY_COMPUTE_DEVICE="cpu",  # the fake GPU nodes have no CUDA
        # a driver that already read its auth mode (this session's cluster) joins either way
        RAY_AUTH_MODE="disabled",
        **{MARKER: tmp},  # finds this cluster's processes at the end
    )
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    with open(os.path.join(tmp, "head.log"), "w") as log:
        head = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
             f"--autoscaling-config={config}", "--node-ip-address=127.0.0.1",
             f"--temp-dir={tmp}", "--include-dashboard=false", "--disable-usage-stats",
             f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
             f"--object-store-memory={150 * 1024 * 1024}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.time() + 180
        while True:
            try:
                init_ray(f"127.0.0.1:{port}")
                break
            except Exception:  # noqa: BLE001 - the head is still starting
                if time.time() > deadline or head.poll() is not None:
                    raise
                time.sleep(2)
        # the autoscaler reports once it has the head's load metrics (a few seconds)
        while not cluster_view().autoscaling and time.time() < deadline:
            time.sleep(1)
        yield {"address": f"127.0.0.1:{port}", "tmp": tmp}
    finally:
        ray.shutdown()
        _stop_cluster(head, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if had_session_cluster:
            ray.init(**session_cluster_args())
            configure_data_context()


@pytest.fixture(scope="module")
def zoo_s3(tmp_path_factory, s3_server):
    """A tiny toy zoo on local disk and the same files on S3: (local folder, s3 root)."""
    from reid_ray import io as rio
    from reid_ray.synth import generate_zoo

    local = tmp_path_factory.mktemp("as-zoo")
    generate_zoo(str(local), species=1, individuals=4, images_per=2, size=64, seed=3)
    fs, _ = rio.filesystem("s3://rr-autoscaling")
    fs.mkdir("rr-autoscaling")
    fs.put(str(local / "images"), "rr-autoscaling/zoo/images", recursive=True)
    fs.put(str(local / "metadata.csv"), "rr-autoscaling/zoo/metadata.csv")
    return {"local": local, "s3": "s3://rr-autoscaling"}


def _actors(class_fragment: str) -> dict[str, str]:
    """Actor id -> node id of the actors (alive or finished) whose class name holds the
    fragment."""
    from ray._private import state

    return {
        actor_id: a["Address"]["NodeID"]
        for actor_id, a in state.actors().items()
        if class_fragment in a.get("ActorClassName", "") and a.get("Address", {}).get("NodeID")
    }


def _gpu_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def _run_pool(actor, rows: pa.Table, plan, **ctor) -> list[dict]:
    """``rows`` (one block per row) through a pool of ``actor`` sized by ``plan``."""
    import ray.data

    ds = ray.data.from_arrow([rows.slice(i, 1) for i in range(rows.num_rows)]).map_batches(
        actor,
        fn_constructor_kwargs={**ctor, "threads": plan.threads},
        batch_size=1,
        batch_format="pyarrow",
        **plan.map_batches_kwargs(),
    )
    return [
        r for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()
    ]


def test_gpu_configs_grow_the_cluster_and_cpu_work_stays_on_cpu(
    autoscaling_cluster, zoo_s3, tmp_path
):
    import ray

    from reid_ray.data import read_manifest
    from reid_ray.embed import embed
    from reid_ray.embed.config import load_embed_config
    from reid_ray.rerank.actors import FeatureActor, MatchActor, plan_stage_pool
    from reid_ray.rerank.config import load_rerank_config
    from reid_ray.rerank.features import feature_fingerprint
    from reid_ray.runtime import (
        cluster_view,
        hide_unassigned_gpus,
        require_readable_inputs,
        require_shared_output,
    )

    # 1. only the head is up, but the cluster can grow: local paths are refused now
    view = cluster_view()
    assert view.autoscaling and view.nodes == 1 and view.gpus == 0
    with pytest.raises(OutputError, match="autoscales"):
        require_shared_output(str(tmp_path / "out"), "embed --out")
    local_images = read_manifest(str(zoo_s3["local"] / "metadata.csv")).table["path"]
    with pytest.raises(ManifestError, match="local paths"):
        require_readable_inputs(local_images.to_pylist())
    with pytest.raises(ManifestError, match="can be read from a Ray worker"):
        require_readable_inputs([f"{zoo_s3['s3']}/zoo/images/missing.png"])

    # 2. the shipped GPU embed config: the autoscaler adds GPU nodes, the actors land there
    cfg = load_embed_config(
        str(CONFIGS / "gpu_embed.yaml"),  # device cuda, 1 GPU per actor, from the file
        {
            "actors": 1,
            "image_size": 32,
            "batch_size": 4,
            "decode_cpus": 0.25,
            "decode_batch_size": 4,
            "rows_per_part": 4,
        },  # sized for the toy cluster
    )
    assert cfg.device == "cuda" and cfg.gpus_per_actor == 1
    manifest = f"{zoo_s3['s3']}/zoo/metadata.csv"
    summary = embed(manifest, MODEL, f"{zoo_s3['s3']}/embed", cfg)
    assert summary.n_embedded == 8 and summary.n_errors == 0
    assert summary.plan["device"] == "cuda" and summary.plan["gpus_per_actor"] == 1
    gpu_nodes = _gpu_nodes()
    assert 1 <= len(gpu_nodes) <= GPU_NODES  # added for the pending GPU actor
    embedders = set(_actors("Embedder").values())
    assert embedders and embedders <= gpu_nodes

    # 3. an actor that holds no GPU on a GPU node sees none once hidden
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=0)
    def visible() -> tuple:
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        return before, hide_unassigned_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES")

    on_gpu_node = NodeAffinitySchedulingStrategy(sorted(gpu_nodes)[0], soft=False)
    assert ray.get(visible.options(scheduling_strategy=on_gpu_node).remote()) == (None, True, "")

    # 4. re-ranking: ALIKED + LightGlue (the shipped GPU config) on GPU actors, SIFT +
    # classical matching on CPU pools whatever the device
    rows = read_manifest(manifest).table.select(["image_id", "path"])
    rows = rows.append_column("bbox", pa.nulls(rows.num_rows, pa.list_(pa.float64())))
    rows = rows.append_column("mask", pa.nulls(rows.num_rows, pa.string()))
    ids = rows["image_id"].to_pylist()
    pairs = pa.table({"query_id": ids[:2], "gallery_ids": [ids[2:4], ids[4:6]]})
    for name, overrides, device in (
        ("lightglue", {"actors": 1, "cpus_per_actor": 1}, "cuda"),
        ("sift", {"extractor": "sift", "matcher": "classical", "device": "cuda"}, "cpu"),
    ):
        rcfg = load_rerank_config(str(CONFIGS / "gpu_rerank.yaml"), **TINY_RERANK, **overrides)
        cache, out = f"{zoo_s3['s3']}/{name}/features", f"{zoo_s3['s3']}/{name}/scores"
        common = dict(cfg=rcfg.to_dict(), cache_root=cache, fingerprint=feature_fingerprint(rcfg))
        before = {**_actors("FeatureActor"), **_actors("MatchActor")}
        feature_plan = plan_stage_pool(rcfg, "features", cluster_view(), blocks=rows.num_rows)
        match_plan = plan_stage_pool(rcfg, "match", cluster_view(), blocks=pairs.num_rows)
        assert {feature_plan.device, match_plan.device} == {device}, name
        assert (feature_plan.gpus_per_actor > 0) == (device == "cuda")
        extracted = _run_pool(FeatureActor, rows, feature_plan, **common)
        assert all(r["ok"] for r in extracted), extracted
        matched = _run_pool(MatchActor, pairs, match_plan, **common, out_dir=out, unavailable={})
        assert sum(r["scored"] for r in matched) == 4, name
        now = {**_actors("FeatureActor"), **_actors("MatchActor")}
        placed = {node for actor, node in now.items() if actor not in before}
        assert placed, name
        if device == "cuda":
            assert placed <= _gpu_nodes(), name
