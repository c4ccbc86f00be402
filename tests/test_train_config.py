"""Training config (read by the shared ``reid_ray.config`` loader): the shipped job file
loads; unknown keys and bad values fail clearly."""

from __future__ import annotations

import pathlib

import pytest

from reid_ray.config import from_dict, replace
from reid_ray.errors import ConfigError
from reid_ray.train.config import JobConfig, TrainConfig, load_job_config

JOB_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "jobs" / "configs" / "train_arcface.yaml"


def test_shipped_job_config_loads():
    job = load_job_config(str(JOB_CONFIG))
    assert isinstance(job, JobConfig)
    assert job.manifest and job.out
    assert job.train.augment.hflip is False  # flanks differ: no flip by default
    assert job.train.loss.margin_min < job.train.loss.margin  # dynamic margins on
    assert job.train.feed == "shards"  # decoded once, not every epoch


def test_defaults_are_valid_and_round_trip():
    cfg = TrainConfig()
    assert cfg.validate() is cfg
    assert from_dict(TrainConfig, cfg.to_dict()) == cfg
    assert cfg.augment.hflip is False
    assert cfg.calibration_fraction == 0.1 and cfg.calibration_min_identities == 20


@pytest.mark.parametrize(
    "data, match",
    [
        ({"epochz": 3}, "unknown setting.*epochz.*valid"),
        ({"loss": {"margn": 0.3}}, r"loss\.margn"),
        ({"augment": {"flip": True}}, r"augment\.flip"),
        ({"epochs": "ten"}, "epochs must be an integer"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": True}, "lr must be a number"),
        ({"augment": {"hflip": "sometimes"}}, "hflip must be true or false"),
        ({"calibration_fraction": 1.0}, r"calibration_fraction must be in \[0, 1\)"),
        ({"loss": {"margin": 0.2, "margin_min": 0.3}}, "margin_min <= margin"),
        ({"augment": {"crop_scale": [0.5]}}, "crop_scale must be a list of 2"),
        ({"sampler": "balanced"}, "sampler must be one of"),
        ({"sampler": "pk", "batch_size": 30, "pk_k": 4}, "batch_size = P x pk_k"),
        ({"pooling": "max"}, "pooling must be one of"),
        ({"feed": "files"}, "feed must be one of"),
        ({"shard_format": "webp"}, "shard_format must be one of"),
        ({"shard_quality": 101}, r"shard_quality must be in \[50, 100\]"),
    ],
)
def test_bad_values_raise_config_error(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, data)


def test_job_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("manifest: m.csv\ntrain:\n  epochs: 2\n  lossy: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*lossy"):
        load_job_config(str(path))
    path.write_text("manifest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_job_config(str(tmp_path / "missing.yaml"))


def test_replace_overrides_and_keeps_nested_sections():
    cfg = replace(TrainConfig(), epochs=3, lr=None, **{"augment.hflip": True, "loss.margin": 0.4})
    assert cfg.epochs == 3 and cfg.lr == TrainConfig().lr  # None leaves the value alone
    assert cfg.augment.hflip is True
    assert (
        cfg.augment.crop_scale == TrainConfig().augment.crop_scale
    )  # the rest of the section stays
    assert cfg.loss.margin == 0.4 and cfg.loss.sub_centers == 3
    with pytest.raises(ConfigError):
        replace(TrainConfig(), workers=0)
