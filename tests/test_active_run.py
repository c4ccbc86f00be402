"""``reid-ray al`` end to end on a tiny toy zoo: rounds recorded, identities hidden from the
learner, a changed config refused, and a killed run resumed after its last finished round
(real Ray, real images, a tiny real model; slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from reid_ray.active.config import load_al_config
from reid_ray.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "jobs", "configs", "al_toyzoo.yaml")


def test_shipped_config_loads_and_bad_settings_fail_fast():
    cfg = load_al_config(CONFIG)
    assert cfg.sampler == "aas" and cfg.train_config("timm:resnet18").epochs == 4
    default = load_al_config({"manifest": "m.csv", "out": "o"}).train_config("timm:resnet18")
    assert (default.epochs, default.sampler) == (4, "random")
    for bad in ({"sampler": "entropy"}, {"budget": "lots"}, {"rounds": 0},
                {"train": {"no_such": 1}}, {"train": {"model": "x"}}):  # fmt: skip
        with pytest.raises(ConfigError):
            load_al_config(CONFIG, bad)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from reid_ray.synth import generate_zoo

    out = tmp_path_factory.mktemp("alzoo")
    s = generate_zoo(str(out), species=2, individuals=16, images_per=6, size=48, seed=5,
                     split_kind="disjoint")  # fmt: skip
    return {"manifest": s.metadata_path, "split": s.split_path}


def _cmd(zoo, out, rounds=2):
    return [
        sys.executable, "-m", "reid_ray.cli", "al", "--manifest", zoo["manifest"],
        "--split", zoo["split"], "--out", out, "--model", "timm-random:resnet18", "--image-size", "32",
        "--sampler", "aas", "--budget", "12", "--rounds", str(rounds), "--epochs", "1",
    ]  # fmt: skip


def _env():
    # Ray's memory monitor kills workers when the whole machine is short of memory, which a
    # machine shared with other jobs often is; the run itself needs well under 1 GB
    return dict(os.environ, RAY_ADDRESS="", RAY_DATA_DISABLE_PROGRESS_BARS="1",
                RAY_memory_monitor_refresh_ms="0")  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two short AL runs; 15 min was not enough on a loaded machine
def test_killed_al_run_resumes_after_its_last_finished_round(zoo, tmp_path):
    out = str(tmp_path / "al")
    r0 = os.path.join(out, "rounds", "r0", "round.json")
    proc = subprocess.Popen(_cmd(zoo, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while not os.path.exists(r0) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert os.path.exists(r0), "round 0 did not finish within 900 s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # driver and its local Ray
        proc.wait(timeout=60)
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # not complete-looking
    first = open(r0).read()
    record0 = json.loads(first)
    assert record0["pairs_asked"] == 6 and record0["annotations"] == 6  # 12 over 2 rounds
    # identities hidden from the learner: the embedded and pseudo-labelled rows carry none
    pseudo = open(os.path.join(out, "rounds", "r0", "pseudo.csv")).read()
    assert "sp0-ind" not in "".join(line.split(",")[2] for line in pseudo.splitlines()[1:])

    done = subprocess.run(_cmd(zoo, out), env=_env(), capture_output=True, timeout=900)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert open(r0).read() == first  # the finished round is not redone
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["rounds_resumed"] == 1 and [r["round"] for r in metrics["rounds"]] == [0, 1]
    r1 = metrics["rounds"][1]
    assert r1["annotations"] == 12 and r1["model"] == record0["checkpoint"]
    for key in ("top1", "mAP", "baks", "baus", "auroc", "nmi", "ari", "pair_precision",
                "pair_recall"):  # fmt: skip
        assert key in r1
    assert 0 <= r1["mAP"] <= 1 and 0 <= r1["pair_precision"] <= 1
    assert set(r1["seconds"]) == {"embed", "cluster", "sample", "ask", "refine", "train",
                                  "evaluate"}  # fmt: skip
    assert metrics["start"]["mAP"] is not None
    assert os.path.getsize(os.path.join(out, "al.png")) > 1000
    assert json.load(open(os.path.join(out, "manifest.json")))["command"] == "al"
    # the answers of round 0 are constraints of round 1, never asked again
    asked0 = {tuple(p) for p in record0["asked"]}
    pairs1 = open(os.path.join(out, "rounds", "r1", "pairs.csv")).read().splitlines()[1:]
    assert not asked0 & {(r.split(",")[1], r.split(",")[3]) for r in pairs1}
    # the same --out with other settings is refused with one clear message
    other = subprocess.run(_cmd(zoo, out, rounds=3), env=_env(), capture_output=True, timeout=300)
    assert other.returncode != 0 and b"other settings (rounds)" in other.stderr + other.stdout
