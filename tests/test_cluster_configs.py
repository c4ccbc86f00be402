"""Every file in cluster/ parses, names files that exist, and agrees with the others.

The image name, Ray version and job entry point appear in several files; these tests fail
when one of them drifts. The Ray cluster launcher config goes through Ray's own schema.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

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


def _dockerfile_steps() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    steps, current = [], ""
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        current += line.rstrip("\\") + " "
        if not line.endswith("\\"):
            if current.strip():
                steps.append(" ".join(current.split()))
            current = ""
    return steps


def test_dockerfile_installs_dependencies_before_the_code():
    steps = _dockerfile_steps()
    copies = [s.split()[1:-1] for s in steps if s.startswith("COPY ")]
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    install = next(i for i, s in enumerate(steps) if "-r /tmp/requirements.txt" in s)
    before = [src for i, s in enumerate(steps[:install]) if s.startswith("COPY ")
              for src in s.split()[1:-1]]  # fmt: skip
    # only what decides the dependencies comes before the ~7 GB layer
    assert sorted(before) == ["cluster/image_requirements.py", "constraints.txt", "pyproject.toml"]
    code = next(i for i, s in enumerate(steps) if s.startswith("COPY reid_ray"))
    assert install < code and "--no-deps ." in steps[code + 1]
    apt = next(s for s in steps if "apt-get install" in s)
    assert {"rsync", "openssh-client", "wget"} <= set(apt.split())  # the launcher's tools
    assert "ARG VARIANT=cpu" in steps
    text = (CLUSTER / "Dockerfile").read_text()
    assert "driver >= 580" in text and "compute capability" in text


def test_dockerignore_keeps_the_venv_out_and_what_the_image_copies_in():
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines()
             if r and not r.startswith("#")]  # fmt: skip
    assert rules[0] == "**"  # everything out, then only what the image copies back in
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for step in _dockerfile_steps():
        if step.startswith("COPY "):
            for src in step.split()[1:-1]:
                assert src.split("/")[0] in allowed, f".dockerignore drops {src}"
    assert ".venv" not in allowed


def test_faiss_is_a_choice_of_extras():
    import tomllib

    sys.path.insert(0, str(CLUSTER))
    from image_requirements import image_requirements

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("faiss")]
    extras = project["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["cpu"]] == ["faiss-cpu"]
    assert [r.split(">")[0] for r in extras["gpu"]] == ["faiss-gpu"]
    cpu, cuda = image_requirements("cpu"), image_requirements("cuda")
    assert set(cpu) ^ set(cuda) == set(extras["cpu"]) | set(extras["gpu"])
    assert not set(extras["test"]) & (set(cpu) | set(cuda))
    assert _pins()["faiss-gpu"] == _pins()["faiss-cpu"]  # the same FAISS release
    assert "'.[cpu,test]'" in (ROOT / "Makefile").read_text()  # make install takes the CPU one


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["image"] == IMAGE
    assert "--gpus all" in config["docker"]["worker_run_options"]
    worker = config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert worker.startswith(("g", "p"))
    assert any("import ray, reid_ray, faiss" in c for c in config["setup_commands"])
    # Ray gives its own IAM role to the head only: every node type names a profile
    for name, node in config["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert any("docker login" in c and IMAGE.split("/")[0] in c
               for c in config["initialization_commands"])  # fmt: skip


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
    pods = [spec["headGroupSpec"]["template"]["spec"], spec["workerGroupSpecs"][0]["template"]["spec"],
            job["spec"]["submitterPodTemplate"]["spec"]]  # fmt: skip
    for pod in pods:
        assert pod["imagePullSecrets"] == [{"name": "reid-ray-registry"}]
    # dated: tonight's manifest and output folder, never one shared folder
    assert "incoming/$(date -u +%F).csv" in job["spec"]["entrypoint"]
    assert "nightly/$(date -u +%F)" in job["spec"]["entrypoint"]


def test_nightly_cronjob_creates_tonights_rayjob():
    sys.path.insert(0, str(CLUSTER))
    from kuberay_night import night_rayjob

    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-nightly-cronjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    assert kinds["Role"]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                                       "verbs": ["create", "get", "list"]}]  # fmt: skip
    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and len(cron["schedule"].split()) == 5
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "reid-ray-nightly"
    assert pod["imagePullSecrets"] == [{"name": "reid-ray-registry"}]
    command = pod["containers"][0]["command"]
    assert command[1] == "/app/cluster/kuberay_night.py" and pod["containers"][0]["image"] == IMAGE
    assert (ROOT / command[1].removeprefix("/app/")).exists()
    template = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    night = night_rayjob(template, "2026-12-08")
    assert night["metadata"]["name"] == "reid-ray-nightly-2026-12-08"
    assert "generateName" not in night["metadata"] and "generateName" in template["metadata"]
    entry = night["spec"]["entrypoint"]
    assert "$(" not in entry
    assert "--manifest s3://reid-ray/incoming/2026-12-08.csv" in entry
    assert "--out s3://reid-ray/nightly/2026-12-08" in entry
    run = subprocess.run([sys.executable, str(CLUSTER / "kuberay_night.py"),
                          str(CLUSTER / "kuberay-rayjob.yaml"), "--print", "--day", "2026-12-09"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert yaml.safe_load(run.stdout)["metadata"]["name"] == "reid-ray-nightly-2026-12-09"


def test_relative_outputs_are_refused(tmp_path):
    sys.path.insert(0, str(CLUSTER))
    from check_outputs import relative_outputs

    config = tmp_path / "c.yaml"
    config.write_text("al:\n  out: al-out\n  manifest: m.csv\n")
    nightly = ["python", "jobs/nightly_reid.py", "--config", "jobs/configs/nightly_reid.yaml"]
    assert relative_outputs([*nightly, "--out", "/shared/n"], ROOT) == []
    assert relative_outputs([*nightly, "--out=s3://b/n"], ROOT) == []
    assert relative_outputs(nightly, ROOT) == []  # the config's out is s3://
    assert relative_outputs([*nightly, "--out", "n/today"], ROOT) == ["--out n/today is relative"]
    assert relative_outputs(["x", "--set", "al.out=runs"], ROOT) == [
        "--set al.out runs is relative"
    ]
    assert relative_outputs(["x", "--config", str(config)], ROOT) == [
        f"{config}: al.out: al-out is relative (give --out)"
    ]
    assert relative_outputs(["x", "--config", str(config), "--out", "/abs"], ROOT) == []
    chained = f"reid-ray gallery build --out /g && python j.py --out rel --config {config}"
    assert relative_outputs(["bash", "-c", chained], ROOT) == ["--out rel is relative"]
    # the shipped train, sweep and benchmark configs write relative folders: caught
    for name in ("train_arcface.yaml", "sweep_toyzoos.yaml", "benchmark_toyzoos.yaml"):
        found = relative_outputs(["python", "j.py", "--config", f"jobs/configs/{name}"], ROOT)
        assert len(found) == 1 and "is relative (give --out)" in found[0], name
    run = subprocess.run([sys.executable, str(CLUSTER / "check_outputs.py"), "x", "--out", "r"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "--out r is relative" in run.stderr


def test_gpu_spec_becomes_a_count():
    script = (
        "source cluster/ray_cluster.sh; for s in 4 a100:4 a100:2,v100:1 ''; do "
        'echo "[$(rr_gpu_count "$s")]"; done; rr_gpu_count gpu:x || echo refused'
    )
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert run.stdout.split() == ["[4]", "[4]", "[3]", "[]", "refused"]
    assert "cannot read a GPU count from 'gpu:x'" in run.stderr


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
