"""The Slurm start-up logic, run on this machine without Slurm (slow).

``cluster/ray_cluster.sh`` starts a Ray head and a worker on 127.0.0.2 (loopback; Ray
rewrites 127.0.0.1 to the machine's address when multi-node clusters are enabled), waits for
them, runs a job through the Ray job API that proves both nodes work, and cleans up. Then
``cluster/slurm_ray.sbatch`` itself submits the nightly job with ``ray job submit``.

The job API needs Ray's dashboard packages (``ray[default]``); when they are missing the
tests skip and say so. ``REID_RAY_DASHBOARD_DEPS`` may name a folder holding them
(``pip install --target``), added to these tests' Ray processes only.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
IP = "127.0.0.2"
pytestmark = pytest.mark.slow


def _ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((IP, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture()
def ray_env(tmp_path):
    env = dict(os.environ)
    env.update(
        PATH=f"{pathlib.Path(sys.executable).parent}:{env.get('PATH', '')}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",  # lets a worker join; we bind to 127.0.0.2
        RAY_AUTH_MODE="disabled",  # loopback only
        RAY_USAGE_STATS_ENABLED="0",
        RR_TMP_ROOT="/tmp",
        RR_NUM_CPUS="1",
    )
    for key in ("RAY_ADDRESS", "AWS_ENDPOINT_URL"):
        env.pop(key, None)
    extra = os.environ.get("REID_RAY_DASHBOARD_DEPS")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    probe = subprocess.run(
        [sys.executable, "-c", "import aiohttp_cors, opencensus, prometheus_client, grpc"],
        env=env, capture_output=True,
    )  # fmt: skip
    if probe.returncode:
        pytest.skip("the Ray job API needs ray[default] (pip install 'ray[default]')")
    return env


def _node_args(kind: str) -> str:
    agent, metrics, grpc = _ports(3)
    extra = f"--node-ip-address={IP} " if kind == "worker" else ""
    return (
        f"{extra}--dashboard-agent-listen-port={agent} --metrics-export-port={metrics} "
        f"--dashboard-agent-grpc-port={grpc} --object-store-memory=100000000"
    )


def _leftovers(marker: str) -> list[str]:
    found = []
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text:
            found.append(text[:120])
    return found


PROBE_JOB = """
import json, sys, ray
ray.init()
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
@ray.remote(num_cpus=0.1)
def where():
    return ray.get_runtime_context().get_node_id()
ran = ray.get([where.options(scheduling_strategy=On(n, soft=False)).remote() for n in nodes])
json.dump({"nodes": nodes, "ran": ran}, open(sys.argv[1], "w"))
"""

SUBMIT = """
import sys, time
from ray.job_submission import JobSubmissionClient, JobStatus
client = JobSubmissionClient(sys.argv[1])
job = client.submit_job(entrypoint="python probe.py " + sys.argv[2],
                        runtime_env={"working_dir": sys.argv[3]})
deadline = time.time() + 300
while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                         JobStatus.STOPPED} and time.time() < deadline:
    time.sleep(1)
status = client.get_job_status(job)
print("JOB", status, client.get_job_logs(job)[-2000:])
sys.exit(0 if status == JobStatus.SUCCEEDED else 1)
"""


def test_head_worker_readiness_job_api_and_cleanup(ray_env, tmp_path):
    gcs, dash = _ports(2)
    job_id = f"t{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "probe.py").write_text(PROBE_JOB)
    (tmp_path / "submit.py").write_text(SUBMIT)
    result = tmp_path / "result.json"
    script = f"""
set -euo pipefail
source cluster/ray_cluster.sh
rr_job_dirs {job_id}
trap rr_cleanup EXIT
RR_DASHBOARD_PORT={dash} RR_HEAD_ARGS="{_node_args("head")}" rr_start_head {IP} {gcs}
rr_wait_gcs {IP} {gcs} 180
RR_WORKER_ARGS="{_node_args("worker")}" rr_start_worker {IP}:{gcs} w1
rr_wait_nodes {IP}:{gcs} 2 300
rr_wait_dashboard http://{IP}:{dash} 180
test -d "$RR_SPILL"
python {tmp_path / "submit.py"} http://{IP}:{dash} {result} {workdir}
"""
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, env=ray_env, capture_output=True,
                         text=True, timeout=840)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "JOB SUCCEEDED" in run.stdout
    assert f"2 Ray node(s) alive at {IP}:{gcs}: ready" in run.stderr
    probe = json.loads(result.read_text())
    assert len(probe["nodes"]) == 2 and sorted(probe["ran"]) == sorted(probe["nodes"])
    assert not pathlib.Path(f"/tmp/rr-{job_id}").exists()  # per-job folder removed
    assert _leftovers(f"/tmp/rr-{job_id}") == []  # every Ray process it started is gone


def test_sbatch_script_submits_the_nightly_job(ray_env, tmp_path):
    import pandas as pd

    from reid_ray.synth import generate_zoo

    zoo = tmp_path / "zoo"
    generate_zoo(str(zoo), species=1, individuals=5, images_per=4, size=48, seed=5)
    meta = pd.read_csv(zoo / "metadata.csv")
    meta["path"] = [str(zoo / p) for p in meta["path"]]
    meta["j"] = meta.groupby("identity").cumcount()
    ids = sorted(meta.identity.unique())
    meta[meta.identity.isin(ids[:4]) & (meta.j < 3)].to_csv(tmp_path / "g.csv", index=False)
    night = meta[(meta.identity.isin(ids[:4]) & (meta.j == 3)) | (meta.identity == ids[4])]
    night.to_csv(tmp_path / "night.csv", index=False)
    gallery, out = tmp_path / "G", tmp_path / "night-1"
    gcs, dash = _ports(2)
    command = (
        f"reid-ray gallery build --manifest {tmp_path / 'g.csv'} --model timm-random:resnet18 "
        f"--out {gallery} --image-size 48 && python jobs/nightly_reid.py "
        f"--config jobs/configs/nightly_reid.yaml --gallery {gallery} "
        f"--manifest {tmp_path / 'night.csv'} --out {out} --merge"
    )
    env = dict(ray_env, RR_HEAD_IP=IP, RAY_PORT=str(gcs), RR_DASHBOARD_PORT=str(dash),
               RR_HEAD_ARGS=_node_args("head"), RR_NUM_CPUS="2", VENV=str(ROOT / ".venv"),
               SLURM_JOB_ID="", SLURM_JOB_NODELIST="")  # fmt: skip
    run = subprocess.run(["bash", "cluster/slurm_ray.sbatch", "bash", "-c", command], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=840)  # fmt: skip
    log = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, log
    assert "SUCCEEDED" in log
    record = json.loads((out / "manifest.json").read_text())
    assert record["command"] == "identify"
    assert record["counts"]["identified"] == len(night)
    assert (gallery / "CURRENT").read_text().strip() == "v0002"
