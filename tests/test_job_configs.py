"""Every config shipped in jobs/configs/ loads with the loader its job uses."""

from __future__ import annotations

import pathlib

import pytest

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "jobs" / "configs"
LOADERS = {
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
