"""USL and AL cells: the active-learning stage (``reid_ray.active``) run on a dataset's split.

The stage is optional here: when ``reid_ray.active`` has no ``run_al`` entry point yet, the
cell fails with that reason (recorded in its JSON and the report) and every other cell runs.
"""

from __future__ import annotations

from typing import Any

from reid_ray.benchmark.config import BenchmarkConfig, MethodSpec
from reid_ray.benchmark.datasets import PreparedDataset
from reid_ray.errors import ConfigError


def run_active_cell(ds: PreparedDataset, method: MethodSpec, cfg: BenchmarkConfig,
                    budget: float | None, work: str) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """One USL (``budget`` None: no annotations) or AL run; ``(results, training)``."""
    try:
        from reid_ray.active import run_al  # type: ignore[attr-defined]
    except ImportError:
        raise ConfigError(
            f"method {method.name}: kind {method.kind} needs the active-learning stage "
            "(reid_ray.active.run_al), which is not available in this installation"
        ) from None
    raise ConfigError(f"method {method.name}: reid_ray.active.run_al is not wired yet ({run_al})")
