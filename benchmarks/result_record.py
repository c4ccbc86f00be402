"""The header every benchmark result JSON starts with, and its atomic write.

A result is only worth quoting with the command that made it, when, on what machine (and
how loaded it was: this 2-core machine is often shared) and what was measured.
"""

from __future__ import annotations

import os
import platform
import sys
import time

from reid_ray import io as rio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def result_record(args, measure: str, *, private=("out", "work"), **fields) -> dict:
    """``command`` (as run from the repository root), ``created``, ``machine``,
    ``settings`` (the parsed arguments, less local paths in ``private``), ``measure``,
    then ``fields``."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return {
        "command": "python " + " ".join([script] + sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in private},
        "measure": measure,
        **fields,
    }


def write_result(path: str, record: dict) -> None:
    """Write atomically: a benchmark killed while writing leaves the previous result."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rio.write_json_atomic(path, record)
