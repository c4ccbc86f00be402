"""What each image variant installs, resolved by pip against the package registry (slow).

The Dockerfile installs ``cluster/image_requirements.py VARIANT`` with constraints.txt. pip's
resolver (``install --dry-run --ignore-installed --report``) computes the full package set of
that list as a fresh image would get it, without installing anything. Each variant must hold
no test tool, exactly one FAISS and the pinned torch and Ray. The same check run on the
`test` extra must flag its tools (so the check can fail). Resolving needs the registry; when
it cannot be reached the tests skip and say so.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))
from image_requirements import image_requirements  # noqa: E402

pytestmark = pytest.mark.slow

# moto[server]'s dependencies that exist only to serve a fake AWS in tests.
TEST_ONLY = {"flask", "flask-cors", "cfn-lint", "responses", "aws-xray-sdk", "py-partiql-parser",
             "openapi-spec-validator", "graphql-core", "iniconfig", "pluggy"}  # fmt: skip
OFFLINE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|Connection refused|ConnectTimeout|"
    r"Read timed out|ProxyError|SSLError|Could not fetch URL"
)


def _name(requirement: str) -> str:
    """A requirement's normalised project name (PEP 503): `moto[server]>=5` -> `moto`."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)[0]).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[_name(name.strip())] = version.strip()
    return pins


def _test_tools() -> set[str]:
    """The test extra's own packages, its fake-AWS server's, and any pytest plugin."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_name(r) for r in project["optional-dependencies"]["test"]} | TEST_ONLY


def _tools_in(packages: dict[str, str]) -> set[str]:
    tools = _test_tools()
    return {name for name in packages if name in tools or name.startswith("pytest")}


def _resolve(requirements: list[str], tmp: pathlib.Path) -> dict[str, str]:
    """{name: version} pip would install into an empty environment, constraints applied."""
    req = tmp / "requirements.txt"
    req.write_text("\n".join(requirements) + "\n")
    report = tmp / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--retries", "2", "--timeout", "60", "--report", str(report),
           "-c", str(ROOT / "constraints.txt"), "-r", str(req)]  # fmt: skip
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("pip's resolver did not finish in 900 s (package registry too slow?)")
    if run.returncode:
        if OFFLINE.search(run.stderr + run.stdout):
            pytest.skip(f"the package registry cannot be reached: {run.stderr.strip()[-300:]}")
        raise AssertionError(f"pip could not resolve the image's requirements:\n{run.stderr}")
    installs = json.loads(report.read_text())["install"]
    return {_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    cache: dict[str, dict[str, str]] = {}

    def get(variant: str) -> dict[str, str]:
        if variant not in cache:
            reqs = image_requirements(variant) if variant != "test" else _test_extra_requirements()
            cache[variant] = _resolve(reqs, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get


def _test_extra_requirements() -> list[str]:
    """The `test` extra alone: a set the check must flag (resolving it is quick)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"]["test"])


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_image_variant_holds_runtime_packages_only(resolved, variant):
    packages = resolved(variant)
    assert _tools_in(packages) == set(), f"the {variant} image would install test tools"
    pins = _pins()
    for name in ("torch", "torchvision", "ray", "opencv-python-headless"):
        assert packages.get(name) == pins[name], (name, packages.get(name), pins[name])
    assert "opencv-python" not in packages  # would clash with opencv-python-headless (cv2)
    faiss = {name for name in packages if name.startswith("faiss")}
    assert faiss == ({"faiss-cpu"} if variant == "cpu" else {"faiss-gpu"})
    assert packages[faiss.pop()] == pins["faiss-cpu"]  # the same FAISS release in both
    unpinned = {f"{name}=={v}" for name, v in packages.items() if pins.get(name) != v}
    assert unpinned == set(), "every package an image gets must be pinned in constraints.txt"


def test_the_check_flags_the_test_extra(resolved):
    found = _tools_in(resolved("test"))
    assert {"pytest", "moto", "ruff", "flask", "cfn-lint"} <= found
