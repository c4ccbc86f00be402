"""The benchmark job: each configured method on each dataset, the paper-style table.

Datasets are a manifest + split, a wildlife-datasets dataset (its metadata table converted
on the way in) or a toy zoo; methods a pretrained model, a trained checkpoint, either with and
without re-ranking, fine-tuning (one model over all species or one per species, MiewID's
comparison), USL and AL at given budgets. ``run_benchmark(cfg)`` is resumable cell by cell.
Importing this package is light.
"""

from reid_ray.benchmark.config import (
    BenchmarkConfig,
    DatasetSpec,
    MethodSpec,
    SplitSpec,
    load_benchmark_config,
)


def run_benchmark(cfg: BenchmarkConfig, **kwargs):
    """Run or resume the benchmark; see :func:`reid_ray.benchmark.runner.run_benchmark`."""
    from reid_ray.benchmark.runner import run_benchmark as _run

    return _run(cfg, **kwargs)


__all__ = [
    "BenchmarkConfig",
    "DatasetSpec",
    "MethodSpec",
    "SplitSpec",
    "load_benchmark_config",
    "run_benchmark",
]
