"""The Ray Tune sweep of AL runs: config, tables, and a real sweep killed and resumed."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from reid_ray.benchmark.sweep import load_sweep_config, trial_out
from reid_ray.benchmark.sweep_report import markdown, summarise
from reid_ray.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sweep_config_loads_and_refuses_bad_settings():
    cfg = load_sweep_config(str(ROOT / "jobs" / "configs" / "sweep_toyzoos.yaml"))
    assert len(cfg.budgets) >= 3 and len(cfg.samplers) >= 3 and len(cfg.seeds) >= 2
    base = {"datasets": [{"name": "a", "manifest": "m.csv"}]}
    with pytest.raises(ConfigError, match="unknown sampler"):
        load_sweep_config({**base, "samplers": ["nope"]})
    with pytest.raises(ConfigError, match="budget"):
        load_sweep_config({**base, "budgets": ["-1"]})
    with pytest.raises(ConfigError, match="set per trial"):
        load_sweep_config({**base, "al": {"sampler": "aas"}})


def test_summary_mean_and_spread_over_seeds():
    trials = pd.DataFrame(
        {
            "dataset": ["z"] * 4, "sampler": ["aas"] * 4, "budget": ["1%", "1%", "2%", "2%"],
            "budget_value": [0.01, 0.01, 0.02, 0.02], "seed": [0, 1, 0, 1],
            "finished": [True, True, True, False], "mAP": [0.4, 0.6, 0.7, None],
            "top1": [0.5, 0.5, 0.8, None], "auroc": [0.6, 0.8, 0.9, None],
            "pairs": [3, 3, 6, None],
        }
    )  # fmt: skip
    s = summarise(trials)
    assert list(s["seeds"]) == [2, 1]
    assert s.loc[0, "mAP_mean"] == pytest.approx(0.5)
    assert s.loc[0, "mAP_std"] == pytest.approx(0.1414, abs=1e-3)
    assert s.loc[1, "mAP_std"] == 0.0
    assert "0.500 ± 0.141" in markdown(s)


@pytest.mark.slow
def test_sweep_killed_and_resumed(tmp_path):
    """A real sweep (own local Ray cluster in a subprocess) is killed once its first trial
    finished; the rerun restores the experiment and does not redo that trial."""
    config = {
        "out": str(tmp_path / "sweep"),
        "model": "timm:efficientnet_lite0",
        "image_size": 32,
        "datasets": [{"name": "zoo", "synth": {"species": 1, "individuals": 8, "images_per": 4,
                                                "size": 64, "seed": 3}}],
        "split": {"train_fraction": 0.5, "val_fraction": 0.0, "unknown_fraction": 0.25},
        "samplers": ["random"],
        "budgets": ["5%", "20%"],
        "seeds": [0],
        "al": {"rounds": 1, "train": {"epochs": 1, "workers": 1, "cpus_per_worker": 1.0,
                                      "batch_size": 4}},
        "num_cpus": 2,
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "reid_ray.cli", "sweep", "--config", str(path)]
    # manifest.json is an AL run's last file: its presence means the run is complete
    first = trial_out(config["out"], "zoo", "random", "5%", 0) + "/manifest.json"
    second = trial_out(config["out"], "zoo", "random", "20%", 0) + "/manifest.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 1500
        while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # poll: the first trial ends at an unknown moment
        assert os.path.exists(first), (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_early = not os.path.exists(second)
    first_metrics = first.replace("manifest.json", "metrics.json")
    mtime = os.stat(first_metrics).st_mtime_ns
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert os.stat(first_metrics).st_mtime_ns == mtime  # the finished trial was not redone
    assert os.path.exists(second)
    trials = pd.read_csv(tmp_path / "sweep" / "trials.csv")
    assert trials["finished"].all() and len(trials) == 2
    assert (tmp_path / "sweep" / "sweep.png").exists()
    assert "random" in (tmp_path / "sweep" / "sweep.md").read_text()
    if killed_early:
        assert "resumed: True" in rerun.stdout.replace("\n", " ")
    # Tune's own result files of trials finished before the kill may be missing: the
    # tables come from the runs' metrics.json, so that is no warning for the terminal
    assert "Failed to fetch metrics" not in rerun.stdout + rerun.stderr
