"""Resource planning from the job (``runtime.plan_pool`` and the stages' policies over it)
and the guards of a run: the error-rate threshold, inputs read from a worker first, local
outputs on a single-node cluster without an autoscaler. Pure tests first, then a few on
the session's local Ray cluster (``conftest.ray_cluster``)."""

from __future__ import annotations

import os

import pytest

from reid_ray.embed.config import EmbedConfig, plan_resources
from reid_ray.errors import ConfigError, ManifestError
from reid_ray.rerank.actors import plan_stage_pool
from reid_ray.rerank.config import RerankConfig
from reid_ray.runtime import (
    ClusterView,
    ErrorRateError,
    check_error_rate,
    plan_pool,
    reports_autoscaling,
)

SIFT = dict(extractor="sift", matcher="classical")


# --- plan_pool: asked, not snapshotted ------------------------------------------------------


def test_auto_device_plans_gpus_the_autoscaler_config_offers():
    """A cluster that starts with no GPU node but whose autoscaler config has GPU nodes."""
    later = ClusterView(cpus=4, gpus=0, autoscaling=True, max_gpus=8)
    plan = plan_pool(later, device="auto")
    assert (plan.device, plan.actors, plan.gpus_per_actor, plan.waits_for_gpus) == (
        "cuda",
        8,
        1.0,
        True,
    )
    assert plan_pool(later, device="auto", max_actors=2).actors == 2  # sized by the work


def test_auto_device_without_gpu_information_stays_on_cpu_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="reid_ray.runtime"):
        plan = plan_pool(ClusterView(cpus=4, gpus=0, autoscaling=True), device="auto")
    assert plan.device == "cpu"
    assert "device: cuda" in caplog.text


def test_gpu_pool_is_capped_by_the_work_unless_sized_explicitly():
    big = ClusterView(cpus=64, gpus=16)
    assert plan_pool(big, device="cuda", max_actors=1).actors == 1
    assert plan_pool(big, device="cuda").actors == 16
    assert plan_pool(big, device="cuda", actors=4, max_actors=1).actors == 4  # exactly as asked


@pytest.mark.parametrize(
    ("rows", "gpus", "actors"), [(5_000, 16, 1), (140_000, 16, 7), (140_000, 4, 4), (0, 4, 4)]
)
def test_embedding_pool_sized_by_the_images(rows, gpus, actors):
    plan = plan_resources(EmbedConfig(device="cuda"), ClusterView(64, gpus), rows=rows)
    assert (plan.device, plan.actors) == ("cuda", actors)


def test_embedding_gpu_request_waits_for_the_autoscaler_and_asks_per_actor():
    cfg = EmbedConfig(device="cuda", actors=3, gpus_per_actor=0.5)
    plan = plan_resources(cfg, ClusterView(cpus=2, gpus=0, autoscaling=True), rows=140_000)
    assert (plan.device, plan.actors, plan.gpus_per_actor) == ("cuda", 3, 0.5)
    assert plan.waits_for_gpus and plan.precision == "fp16"
    with pytest.raises(ConfigError, match="contradicts"):
        plan_resources(EmbedConfig(device="cpu", gpus_per_actor=1), ClusterView(8, 0))


def test_small_night_on_cpu_starts_one_actor():
    plan = plan_resources(EmbedConfig(), ClusterView(cpus=64, gpus=0), rows=1_000)
    assert (plan.device, plan.actors) == ("cpu", 1)
    assert plan_resources(EmbedConfig(), ClusterView(64, 0), rows=100_000).actors == 8


# --- re-ranking: CPU code on CPU pools ------------------------------------------------------


def test_sift_and_classical_matching_plan_cpu_pools_on_a_gpu_cluster():
    gpus = ClusterView(cpus=32, gpus=4)
    cfg = RerankConfig(**SIFT, device="cuda", gpus_per_actor=1)
    for stage in ("features", "match"):
        plan = plan_stage_pool(cfg, stage, gpus, blocks=100)
        assert (plan.device, plan.gpus_per_actor) == ("cpu", 0.0), stage
        assert plan.actors > 4  # a CPU pool, not one actor per GPU
    mixed = RerankConfig(extractor="disk", matcher="classical", device="cuda")
    assert plan_stage_pool(mixed, "features", gpus).device == "cuda"
    assert plan_stage_pool(mixed, "match", gpus).device == "cpu"


def test_lightglue_asks_for_gpus_before_gpu_nodes_exist():
    cfg = RerankConfig(device="cuda")  # ALIKED + LightGlue
    plan = plan_stage_pool(cfg, "match", ClusterView(cpus=2, gpus=0, autoscaling=True), blocks=3)
    assert plan.device == "cuda" and plan.gpus_per_actor == 1 and plan.waits_for_gpus
    assert plan_stage_pool(cfg, "match", ClusterView(64, 16), blocks=3).actors == 3
    with pytest.raises(ConfigError, match="stage"):
        cfg.stage_device("decode")


# --- is the cluster able to grow? ---------------------------------------------------------


def test_autoscaler_report_of_a_real_autoscaler_and_of_a_fixed_cluster():
    # as Ray's fake autoscaling cluster reported it (head type and the config's GPU type)
    real = {
        "active_nodes": {"ray.head.default": 1},
        "pending_launches": {"gpu": 1},
        "node_type_mapping": {"ff00000": "ray.head.default"},
    }
    assert reports_autoscaling(real)
    assert reports_autoscaling({"active_nodes": {"head-group": 1}})  # KubeRay group names
    # a fixed cluster's read-only autoscaler: one anonymous type per node
    fixed = {"active_nodes": {"node_ab12": 1}, "node_type_mapping": {"ab12": "node_ab12"}}
    assert not reports_autoscaling(fixed)
    assert not reports_autoscaling({})


# --- the error-rate threshold ---------------------------------------------------------------


def test_error_rate_threshold():
    check_error_rate(5, 10, "rows")  # half: still a run
    check_error_rate(0, 0, "rows")
    with pytest.raises(ErrorRateError, match=r"6 of 10 rows \(60%\).*max_error_rate 0.5"):
        check_error_rate(6, 10, "rows")
    with pytest.raises(ErrorRateError, match="in OUT/errors"):
        check_error_rate(2, 10, "rows", 0.1, where="OUT/errors")
    check_error_rate(10, 10, "rows", 1.0)  # 1.0: never
    with pytest.raises(ConfigError, match="max_error_rate"):
        EmbedConfig(max_error_rate=1.5)


# --- on the session's Ray cluster -----------------------------------------------------------


def test_single_node_without_autoscaler_accepts_local_paths(ray_cluster, tmp_path):
    from reid_ray.runtime import cluster_view, require_readable_inputs, require_shared_output

    assert not cluster_view().autoscaling
    require_shared_output(str(tmp_path / "out"))
    good = tmp_path / "a.bin"
    good.write_bytes(b"x" * 64)
    require_readable_inputs([str(good), str(tmp_path / "missing.png")])  # one is enough
    with pytest.raises(ManifestError, match="none of the first 2 images.*missing"):
        require_readable_inputs([str(tmp_path / "missing.png"), str(tmp_path / "missing2.png")])


def test_hiding_gpus_applies_to_workers_without_gpus_only(ray_cluster):
    from reid_ray.runtime import hide_unassigned_gpus

    assert hide_unassigned_gpus() is False  # the driver is left alone
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != ""

    @ray_cluster.remote(num_cpus=0)
    def in_worker():
        return hide_unassigned_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES")

    assert ray_cluster.get(in_worker.remote()) == (True, "")


@pytest.mark.slow
def test_embed_fails_when_most_rows_fail_and_leaves_the_output_incomplete(ray_cluster, tmp_path):
    import numpy as np
    from PIL import Image

    from reid_ray import io as rio
    from reid_ray import parts
    from reid_ray.embed import embed

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "good.png")
    lines = ["image_id,path", "good,good.png"]
    for i in range(3):  # files that exist (the worker reads them) but are no images
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image at all")
        lines.append(f"bad{i},bad{i}.png")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    cfg = EmbedConfig(image_size=32, batch_size=4)
    with pytest.raises(ErrorRateError, match="3 of 4 rows"):
        embed(str(tmp_path / "manifest.csv"), "timm-random:resnet18", out, cfg)
    assert not rio.exists(rio.join(out, parts.MANIFEST_FILE))  # not a finished output
    assert parts.list_parts(rio.join(out, "errors"))  # the reasons are there to read
    done = embed(str(tmp_path / "manifest.csv"), "timm-random:resnet18", out, cfg.replace(
        max_error_rate=1.0))  # fmt: skip
    assert done.n_embedded == 0 and done.n_already_embedded == 1 and done.n_errors == 3
