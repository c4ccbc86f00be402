"""The Slurm launcher: its start-up logic without Slurm, then a real one-node Slurm (slow).

``cluster/ray_cluster.sh`` starts a Ray head and a worker on 127.0.0.2 (loopback; Ray
rewrites 127.0.0.1 to the machine's address when multi-node clusters are enabled), waits for
them, runs a job through the Ray job API that proves both nodes work, and cleans up. Then
``sbatch cluster/slurm_ray.sbatch`` runs on a real Slurm started by the test (Debian's
``slurm-wlm``: munged, slurmctld, slurmd, with a private config, ports and spool under /tmp,
four fake GPUs as GRES): the gallery build and the nightly job finish, the job is COMPLETED,
Ray got the CPUs and GPUs the job asked for, and every temp folder and process is gone.
Without Slurm installed (``apt-get install slurm-wlm munge``, which .ci/run tries) or
without root, the Slurm tests skip and say why, and the script runs without Slurm instead.

The job API needs Ray's dashboard packages (``ray[default]``); when they are missing the
tests skip and say so. ``REID_RAY_DASHBOARD_DEPS`` may name a folder holding them
(``pip install --target``), added to these tests' Ray processes only.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
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
start() {{
    RR_DASHBOARD_PORT={dash} RR_HEAD_ARGS="{_node_args("head")}" rr_start_head {IP} {gcs}
    rr_wait_gcs {IP} {gcs} 180 || return 1
    RR_WORKER_ARGS="{_node_args("worker")}" rr_start_worker {IP}:{gcs} w1
    rr_wait_nodes {IP}:{gcs} 2 300 || return 1
    rr_wait_dashboard http://{IP}:{dash} 180
}}
rr_start_attempts 3 start  # a loaded machine can miss the raylet's 15 s wait for its agents
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


def _nightly_case(
    tmp_path: pathlib.Path, *sets: str
) -> tuple[str, pathlib.Path, pathlib.Path, int]:
    """A toy gallery build + nightly job command; (command, gallery, out, night rows)."""
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
    options = "".join(f" --set {s}" for s in sets)
    command = (
        f"reid-ray gallery build --manifest {tmp_path / 'g.csv'} --model timm-random:resnet18 "
        f"--out {gallery} --image-size 48{options} && python jobs/nightly_reid.py "
        f"--config jobs/configs/nightly_reid.yaml --gallery {gallery} "
        f"--manifest {tmp_path / 'night.csv'} --out {out} --merge{options}"
    )
    return command, gallery, out, len(night)


def _check_nightly(gallery: pathlib.Path, out: pathlib.Path, rows: int) -> None:
    record = json.loads((out / "manifest.json").read_text())
    assert record["command"] == "identify"
    assert record["counts"]["identified"] == rows
    assert (gallery / "CURRENT").read_text().strip() == "v0002"


def test_sbatch_script_submits_the_nightly_job(ray_env, tmp_path):
    if _slurm_missing() is None:
        pytest.skip("Slurm is here: test_sbatch_on_a_real_slurm runs the script through sbatch")
    command, gallery, out, rows = _nightly_case(tmp_path)
    gcs, dash = _ports(2)
    env = dict(ray_env, RR_HEAD_IP=IP, RAY_PORT=str(gcs), RR_DASHBOARD_PORT=str(dash),
               RR_HEAD_ARGS=_node_args("head"), RR_NUM_CPUS="2", VENV=sys.prefix,
               SLURM_JOB_ID="", SLURM_JOB_NODELIST="")  # fmt: skip
    run = subprocess.run(["bash", "cluster/slurm_ray.sbatch", "bash", "-c", command], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=840)  # fmt: skip
    log = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, log
    assert "SUCCEEDED" in log
    _check_nightly(gallery, out, rows)


# ---------------------------------------------------------------- a real one-node Slurm

SLURM_DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def _slurm_missing() -> str | None:
    """Why a real Slurm cannot run here, or None."""
    absent = [d for d in SLURM_DAEMONS if not shutil.which(d, path=_SBIN_PATH)]
    if absent:
        return (
            f"Slurm is not installed ({', '.join(absent)} missing; apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps"
    return None


_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def _wait(what: str, check, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: {proc.args[0]} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.5)


SLURM_CONF = """ClusterName=rrtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 Gres=gpu:a100:4 State=UNKNOWN
PartitionName=rrtest Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
    """munged + slurmctld + slurmd on this machine, private to this test; the env to use it."""
    why = _slurm_missing()
    if why:
        pytest.skip(why)
    # munge's and Ray's socket paths must stay short: a folder straight under /tmp
    folder = pathlib.Path(tempfile.mkdtemp(prefix="rr-slurm-", dir="/tmp"))
    folder.chmod(0o711)  # munged wants its socket's folder searchable by all
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for i in range(4):  # four fake GPUs: GRES wants device files; these are /dev/null's twin
        try:
            os.mknod(folder / f"gpu{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError as err:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip(f"cannot make the fake GPU devices Slurm's GRES needs: {err}")
    host = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = _ports(2)
    (folder / "slurm.conf").write_text(SLURM_CONF.format(
        host=host, dir=folder, ctld_port=ctld_port, slurmd_port=slurmd_port,
        cpus=os.cpu_count()))  # fmt: skip
    (folder / "gres.conf").write_text(
        f"NodeName={host} Name=gpu Type=a100 File={folder}/gpu[0-3]\n"
    )
    env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"), PATH=_SBIN_PATH)
    for key_ in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        if key_ != "SLURM_CONF":
            env.pop(key_)
    procs = []

    def start(*cmd: str) -> subprocess.Popen:
        log = open(folder / f"{cmd[0]}.out", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        return proc

    try:
        munged = start("munged", "--foreground", "--force", f"--socket={folder}/munge.sock",
                       f"--key-file={key}", f"--log-file={folder}/munged.log",
                       f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed")  # fmt: skip
        _wait("munged", (folder / "munge.sock").exists, 60, [munged])
        ctld = start("slurmctld", "-D", "-i")
        slurmd = start("slurmd", "-D")

        def node_idle() -> bool:
            run = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                 text=True)  # fmt: skip
            return run.stdout.strip() == "idle"

        try:
            _wait("the Slurm node", node_idle, 180, [ctld, slurmd])
        except AssertionError as err:
            logs = "".join(
                (folder / f).read_text()[-1500:] for f in ("slurmctld.out", "slurmd.out")
            )
            raise AssertionError(f"{err}\n{logs}") from None
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        for proc, log in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _with_slurm(ray_env: dict, slurm: dict) -> dict:
    """The Ray test environment plus this test's Slurm (its config; no outer job's vars)."""
    env = {k: v for k, v in ray_env.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    return dict(env, SLURM_CONF=slurm["SLURM_CONF"], PATH=f"{ray_env['PATH']}:{_SBIN_PATH}")


def _job_state(env: dict, job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                          text=True).stdout  # fmt: skip
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def _sbatch(env: dict, tmp_path: pathlib.Path, *args: str, timeout: float = 840):
    """`sbatch --wait` of the script on this test's Slurm; (job id, its state, its log)."""
    log = tmp_path / "slurm-%j.log"
    cmd = ["sbatch", "--parsable", "--wait", "--nodes=1", f"--cpus-per-task={os.cpu_count()}",
           "--gpus-per-task=a100:4", f"--output={log}", f"--chdir={ROOT}",
           "cluster/slurm_ray.sbatch", *args]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    job = run.stdout.strip().split(";")[0].splitlines()[0] if run.stdout.strip() else ""
    assert job.isdigit(), f"sbatch gave no job id: {run.stdout} {run.stderr}"
    text = pathlib.Path(str(log).replace("%j", job)).read_text()
    return job, _job_state(env, job), text


def test_sbatch_on_a_real_slurm(slurm, ray_env, tmp_path):
    # Ray is told of the four fake GPUs; the work itself runs on the CPU (there is no CUDA)
    command, gallery, out, rows = _nightly_case(tmp_path, "embed.device=cpu")
    gcs, dash = _ports(2)
    probe = ("python -c \"import ray; ray.init(); r = ray.cluster_resources(); "
             "print('RESOURCES', int(r['CPU']), int(r.get('GPU', 0)))\"")  # fmt: skip
    env = _with_slurm(ray_env, slurm)
    env.update(RR_HEAD_IP=IP, RAY_PORT=str(gcs), RR_DASHBOARD_PORT=str(dash),
               RR_HEAD_ARGS=_node_args("head"), VENV=sys.prefix,
               RR_TOKEN_DIR=str(tmp_path / "tokens"), RR_START_TIMEOUT="400")  # fmt: skip
    env.pop("RR_NUM_CPUS")  # from Slurm's --cpus-per-task
    env.pop("RAY_AUTH_MODE")  # Ray's token authentication, as a user gets it
    # a loaded machine can miss the raylet's fixed 15 s wait for its agents: the script
    # starts the cluster again (up to RR_START_ATTEMPTS times)
    env["RR_START_ATTEMPTS"] = "4"
    # Ray's memory monitor kills workers when the machine's memory is 95% used, whoever uses
    # it: on a machine shared with other test runs that fails the job for nothing it did
    env["RAY_memory_monitor_refresh_ms"] = "0"
    job, state, log = _sbatch(env, tmp_path, "bash", "-c", f"{probe} && {command}")
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", log[-6000:]
    assert "SUCCEEDED" in log
    assert f"RESOURCES {os.cpu_count()} 4" in log  # -c reached Ray; a100:4 became --num-gpus=4
    _check_nightly(gallery, out, rows)
    assert not pathlib.Path(f"/tmp/rr-{job}").exists()  # the node's temp folder is gone
    assert _leftovers(f"/tmp/rr-{job}") == []  # and every Ray process
    assert list((tmp_path / "tokens").iterdir()) == []  # the token copy is removed
    assert not list(ROOT.glob(".ray-auth*"))  # and none was ever in the uploaded folder


def test_sbatch_refuses_a_relative_out(slurm, ray_env, tmp_path):
    env = dict(_with_slurm(ray_env, slurm), VENV=sys.prefix)
    job, state, log = _sbatch(env, tmp_path, "python", "jobs/nightly_reid.py", "--config",
                              "jobs/configs/nightly_reid.yaml", "--out", "nightly/today",
                              timeout=300)  # fmt: skip
    assert state.get("JobState") == "FAILED" and state.get("ExitCode") == "2:0", log
    assert "--out nightly/today is relative" in log
    assert "Ray head starting" not in log  # refused before anything started
