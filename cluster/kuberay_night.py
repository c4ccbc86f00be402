"""Create tonight's RayJob from cluster/kuberay-rayjob.yaml (run by the nightly CronJob).

    python /app/cluster/kuberay_night.py /template/rayjob.yaml            # in the CronJob's pod
    python cluster/kuberay_night.py cluster/kuberay-rayjob.yaml --print   # what it would create

The RayJob gets the night in its name (`reid-ray-nightly-2026-12-08`) and in its paths
(every `$(date -u +%F)` of the entrypoint becomes that day), so the job's name, its manifest
and its output folder agree, and a second run the same night is refused by Kubernetes
(AlreadyExists, reported and exit 0) instead of starting a second cluster on the same output.
KubeRay's own RayCronJob is alpha, behind a feature gate, and its fields are still changing,
so the schedule is a plain Kubernetes CronJob running this script. It talks to the API server
with the pod's service account (cluster/kuberay-nightly-cronjob.yaml grants it `create` on
rayjobs in its namespace). Only the standard library and PyYAML (both in the image).
"""

from __future__ import annotations

import copy
import datetime
import json
import pathlib
import ssl
import sys
import urllib.error
import urllib.request

import yaml

DATE = "$(date -u +%F)"
ACCOUNT = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")


def night_rayjob(template: dict, day: str) -> dict:
    """The RayJob for `day` (YYYY-MM-DD): dated name, label and paths; the template untouched."""
    job = copy.deepcopy(template)
    if job.get("kind") != "RayJob":
        raise SystemExit(f"the template is a {job.get('kind')!r}, not a RayJob")
    meta = job.setdefault("metadata", {})
    meta.pop("generateName", None)
    meta["name"] = f"reid-ray-nightly-{day}"
    meta.setdefault("labels", {})["reid-ray/night"] = day
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(DATE, day)
    return job


def create(job: dict) -> int:
    """POST the RayJob with the pod's service account; 0 when created or already there."""
    namespace = (ACCOUNT / "namespace").read_text().strip()
    request = urllib.request.Request(
        f"https://kubernetes.default.svc/apis/ray.io/v1/namespaces/{namespace}/rayjobs",
        data=json.dumps(job).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {(ACCOUNT / 'token').read_text().strip()}",
            "Content-Type": "application/json",
        },
    )
    context = ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt"))
    try:
        with urllib.request.urlopen(request, context=context, timeout=60):
            print(f"created RayJob {job['metadata']['name']} in {namespace}")
    except urllib.error.HTTPError as err:
        if err.code == 409:
            print(f"RayJob {job['metadata']['name']} already exists: tonight is already running")
            return 0
        print(f"creating RayJob {job['metadata']['name']} failed: {err.code} {err.read()[:500]}")
        return 1
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(
            "usage: kuberay_night.py RAYJOB_TEMPLATE.yaml [--print] [--day YYYY-MM-DD]"
        )
    day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    if "--day" in argv:
        day = argv[argv.index("--day") + 1]
        datetime.date.fromisoformat(day)  # refuse anything but a date
    job = night_rayjob(yaml.safe_load(pathlib.Path(argv[0]).read_text()), day)
    if "--print" in argv:
        print(yaml.safe_dump(job, sort_keys=False))
        return 0
    return create(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
