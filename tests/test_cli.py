"""The ``reid-ray`` command as a user meets it: help, the toy zoo, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

COMMANDS = ["synth", "embed", "index", "search", "evaluate", "train", "rerank", "demo"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "reid_ray.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_help_lists_every_stage():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout or "--gallery" in result.stdout


def test_synth_writes_a_usable_manifest(tmp_path):
    from reid_ray.data import read_manifest

    out = tmp_path / "zoo"
    result = run_cli(
        "synth", "--out", str(out), "--individuals", "12", "--images-per", "3", "--size", "96"
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(str(out / "metadata.csv"), split_file=str(out / "split.csv"))
    assert len(manifest) == 36 and manifest.errors.num_rows == 0
    assert manifest.to_pandas()["identity"].nunique() == 12
    assert set(pd.read_csv(out / "split.csv")["split"]) <= {
        "train",
        "val",
        "query",
        "gallery",
        "query_unknown",
    }


def test_bad_arguments_fail_fast_with_one_clear_message(tmp_path):
    result = run_cli("evaluate", "--manifest", str(tmp_path / "absent.csv"), "--model", "timm-random:resnet18",
                     "--out", str(tmp_path / "o"))  # fmt: skip
    assert result.returncode == 2
    assert "manifest not found" in result.stderr and "Traceback" not in result.stderr

    (tmp_path / "m.csv").write_text("image_id,path\na,a.jpg\n")
    result = run_cli(
        "embed",
        "--manifest",
        str(tmp_path / "m.csv"),
        "--model",
        "resnet18",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2
    assert "timm:resnet18" in result.stderr and "Traceback" not in result.stderr
