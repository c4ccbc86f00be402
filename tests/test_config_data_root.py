"""Configs name a user's folders by ``${data_root}``: filled from ``--set`` or the
environment by the one config loader, one clear error when unset."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from reid_ray.config import load_config
from reid_ray.errors import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "jobs" / "configs"


@dataclasses.dataclass(frozen=True)
class Paths:
    out: str = ""
    manifest: str = ""
    k: int = 10


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: ${data_root}/runs\nmanifest: ${data_root}/dogs/m.csv\nk: 5\n")
    return str(path)


def test_set_fills_the_placeholder(config_file, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    cfg = load_config(Paths, config_file, ["data_root=/data/", "k=7"])
    assert cfg == Paths(out="/data/runs", manifest="/data/dogs/m.csv", k=7)


def test_the_environment_fills_it_and_set_wins(config_file, monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_ROOT", "s3://bucket/reid")
    assert load_config(Paths, config_file).manifest == "s3://bucket/reid/dogs/m.csv"
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Paths, config_file, ["data_root=mine"])  # relative: to where you are
    assert cfg.out == str(tmp_path / "mine" / "runs")


def test_unset_is_one_clear_error(config_file, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"needs data_root .*--set data_root=.*DATA_ROOT"):
        load_config(Paths, config_file)


def test_shipped_dog_face_configs_name_no_machine_folder(monkeypatch, tmp_path):
    from reid_ray.benchmark.config import load_benchmark_config

    monkeypatch.delenv("DATA_ROOT", raising=False)
    paths = sorted(CONFIGS.glob("benchmark_*dogfacenet*.yaml"))
    assert len(paths) == 3
    for path in paths:
        text = path.read_text()
        assert "/work/" not in text, path.name
        with pytest.raises(ConfigError, match="needs data_root"):
            load_benchmark_config(str(path))
        cfg = load_benchmark_config(str(path), [f"data_root={tmp_path}"])
        assert cfg.out.startswith(str(tmp_path))
        assert all(d.manifest.startswith(str(tmp_path)) for d in cfg.datasets)
