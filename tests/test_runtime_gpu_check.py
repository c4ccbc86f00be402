"""``benchmarks/gpu_check.py`` runs on a machine without a GPU: every GPU check is reported
SKIP with its reason, and every CPU fallback runs and passes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_skips_gpu_paths_and_runs_the_cpu_fallbacks(tmp_path):
    out = tmp_path / "gpu_check.json"
    root = str(SCRIPT.parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(out.read_text())
    rows = {(r["check"], r["device"]): r for r in record["checks"]}
    for check in ("embed", "ddp", "lightglue", "faiss"):
        assert rows[(check, "cuda")]["status"] == "SKIP", check
        assert "no GPU" in rows[(check, "cuda")]["reason"]
        cpu = rows[(check, "cpu")]
        assert cpu["status"] == "PASS", cpu
        assert cpu["throughput"] > 0 and cpu["unit"].endswith("/s")
    assert "4 passed, 4 skipped" in done.stdout
