"""Every config shipped in jobs/configs/ loads with the loader its job uses."""

from __future__ import annotations

import pathlib

import pytest

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "jobs" / "configs"
LOADERS = {
    "gpu_embed": "reid_ray.embed.config:load_embed_config",
    "gpu_rerank": "reid_ray.rerank.config:load_rerank_config",
    "gpu_train": "reid_ray.train:load_job_config",
    "gpu_gallery_build": "reid_ray.gallery:load_nightly_config",
    "gpu_nightly": "reid_ray.gallery:load_nightly_config",
    "gpu_sweep": "reid_ray.benchmark.sweep:load_sweep_config",
    "train_": "reid_ray.train:load_job_config",
    "benchmark_": "reid_ray.benchmark.config:load_benchmark_config",
    "sweep_": "reid_ray.benchmark.sweep:load_sweep_config",
    "al_": "reid_ray.active.config:load_al_config",
    "nightly_": "reid_ray.gallery:load_nightly_config",
}


def _loader(name: str):
    import importlib

    for prefix, target in LOADERS.items():
        if name.startswith(prefix):
            module, attr = target.split(":")
            return getattr(importlib.import_module(module), attr)
    raise AssertionError(f"no loader registered for jobs/configs/{name}: add one to LOADERS")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path, monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))  # the dog-face configs' ${data_root}
    config = _loader(path.name)(str(path))
    assert config is not None


def test_there_are_configs():
    assert list(CONFIG_DIR.glob("*.yaml"))


GPU_CONFIGS = sorted(CONFIG_DIR.glob("gpu_*.yaml"))


def _gpu_requests(config) -> list[tuple[str, float | str]]:
    """The GPU requests a loaded config makes, as (field, value) pairs."""
    name = type(config).__name__
    if name == "EmbedConfig" or name == "RerankConfig":
        return [("device", config.device), ("gpus_per_actor", config.gpus_per_actor)]
    if name == "NightlyConfig":
        return [("embed.device", config.embed.device)]
    if name == "JobConfig":
        return [("train.gpus_per_worker", config.train.gpus_per_worker)]
    if name == "SweepConfig":
        return [("al.train.gpus_per_worker", config.al["train"]["gpus_per_worker"])]
    raise AssertionError(f"no GPU request known for {name}")


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_configs_ask_for_gpus_and_write_to_shared_storage(path):
    """A GPU config asks for GPUs explicitly (device: auto would plan from the GPUs present
    at start, and an autoscaling cluster starts with none) and names no local output."""
    config = _loader(path.name)(str(path))
    for field, value in _gpu_requests(config):
        assert value == "cuda" or (isinstance(value, float | int) and value >= 1), (field, value)
    for field in ("out", "gallery", "manifest"):
        value = getattr(config, field, None)
        assert value is None or str(value).startswith("s3://"), (field, value)


def test_every_gpu_stage_has_a_config():
    names = {p.name for p in GPU_CONFIGS}
    for stage in ("embed", "train", "gallery_build", "nightly_identify", "sweep"):
        assert f"gpu_{stage}.yaml" in names
