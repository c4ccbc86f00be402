"""Ray Tune sweep of active-learning settings: budgets x samplers x seeds x datasets.

Each trial is one ``reid_ray.active.run_al`` run (a Tune function trial that runs the
training stage's TorchTrainer inside it, the pattern Ray 2.60 documents: a Tuner around a
TorchTrainer raises). Trials get their own resources (``cpus_per_trial`` / ``gpus_per_trial``:
fractional CPUs here, GPUs on a cluster; the TorchTrainer workers inside ask for theirs) and
at most ``max_concurrent`` run at once.

Layout of ``OUT`` (local or ``s3://``)::

    tune/<name>/                 the Tune experiment (Tuner.restore resumes it)
    runs/<dataset>/<sampler>/<budget>/seed<S>/   each AL run (its rounds resume too)
    splits/<dataset>.csv          the split files used (seeded, identical on every machine)
    sweep.csv, sweep.md           mean and spread over seeds per dataset x sampler x budget
    trials.csv                    one row per trial
    sweep.png                     mAP vs budget per sampler, one panel per dataset
    manifest.json                 the run record, written last

An interrupted sweep resumes: ``run_sweep`` restores the experiment when one is there
(finished trials are not redone; unfinished and errored ones run again, continuing from
their last finished AL round).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from reid_ray import io as rio
from reid_ray.benchmark.config import DatasetSpec, SplitSpec
from reid_ray.config import check, load_config, to_dict
from reid_ray.errors import OutputError

logger = logging.getLogger(__name__)

RESULT_KEYS = ("mAP", "top1", "top5", "auroc", "baks", "baus", "nmi", "ari")


@dataclass(frozen=True)
class SweepConfig:
    """The sweep: every dataset x sampler x budget x seed is one trial. ``al``: other
    ``ALConfig`` settings (rounds, train, cluster...), the same for every trial."""

    out: str = "sweep-out"
    name: str = "al_sweep"
    datasets: tuple[DatasetSpec, ...] = ()
    split: SplitSpec = field(default_factory=SplitSpec)
    budgets: tuple[float | str, ...] = ("0.5%", "1%", "2%")
    samplers: tuple[str, ...] = ("random", "margin", "aas")
    seeds: tuple[int, ...] = (0, 1)
    model: str = "timm:efficientnet_lite0"
    image_size: int | None = None
    al: dict[str, Any] = field(default_factory=dict)
    max_concurrent: int = 1
    cpus_per_trial: float = 0.25
    gpus_per_trial: float = 0.0
    max_failures: int = 1  # retries of a crashed trial (it resumes from its last round)
    ray_address: str | None = None
    num_cpus: int | None = None

    def validate(self) -> None:
        from reid_ray.active import SAMPLERS, parse_budget

        check(len(self.datasets) > 0, "a sweep needs at least one dataset")
        for s in self.samplers:
            check(s in SAMPLERS, f"unknown sampler {s!r}; use {', '.join(SAMPLERS)}")
        for b in self.budgets:
            parse_budget(b)
        check(len(self.budgets) and len(self.samplers) and len(self.seeds), "empty grid")
        check(self.max_concurrent >= 1, "max_concurrent must be >= 1")
        check(self.cpus_per_trial >= 0 and self.gpus_per_trial >= 0, "resources must be >= 0")
        for key in ("manifest", "split", "out", "model", "budget", "sampler", "seed"):
            check(key not in self.al, f"al.{key} is set per trial by the sweep")


def load_sweep_config(source: Any = None, overrides: Any = None) -> SweepConfig:
    return load_config(SweepConfig, source, overrides, section="sweep")


def trial_out(out: str, dataset: str, sampler: str, budget: Any, seed: int) -> str:
    safe = str(budget).replace("%", "pct")
    return rio.join(out, "runs", dataset, sampler, safe, f"seed{seed}")


def al_trial(config: dict[str, Any]) -> None:
    """The Tune trial: one AL run; reports its final metrics (and writes them under its
    run folder, where the tables are read from)."""
    from ray import tune

    from reid_ray.active import load_al_config, run_al

    cell = config["cell"]
    cfg = load_al_config(cell["al"], cell["run"])
    done = rio.join(cfg.out, "metrics.json")
    if rio.exists(rio.join(cfg.out, "manifest.json")) and rio.exists(done):
        metrics = rio.read_json(done)  # finished before Tune saved its state: not redone
    else:
        metrics = run_al(cfg)
    tune.report({key: metrics.get(key) for key in RESULT_KEYS}
                | {"pairs": metrics.get("budget_pairs"), "seconds": metrics.get("total_seconds")})  # fmt: skip


def trial_dirname(trial) -> str:
    """A short trial folder name (Tune's default spells out the whole nested config)."""
    run = trial.config["cell"]["run"]
    budget = str(run["budget"]).replace("%", "pct")
    return f"{trial.config['cell']['dataset']}-{run['sampler']}-{budget}-s{run['seed']}-{trial.trial_id}"


def _grid(cfg: SweepConfig, prepared: dict[str, Any]) -> list[dict[str, Any]]:
    settings = {"evaluate_start": False, **cfg.al}
    cells = []
    for name, ds in prepared.items():
        for sampler in cfg.samplers:
            for budget in cfg.budgets:
                for seed in cfg.seeds:
                    run = {"manifest": ds.manifest, "split": ds.split, "model": cfg.model,
                           "image_size": cfg.image_size, "sampler": sampler,
                           "budget": str(budget), "seed": seed,
                           "out": trial_out(cfg.out, name, sampler, budget, seed)}  # fmt: skip
                    cells.append({"dataset": name, "al": settings, "run": run})
    return cells


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run or resume the sweep; writes the tables and the plot; returns the summary."""
    import ray
    from ray import tune

    from reid_ray.benchmark.config import BenchmarkConfig
    from reid_ray.benchmark.datasets import prepare_dataset
    from reid_ray.benchmark.sweep_report import write_sweep_outputs
    from reid_ray.parts import write_run_record
    from reid_ray.runtime import init_ray, require_shared_output

    t0 = time.perf_counter()
    init_ray(cfg.ray_address, cfg.num_cpus)
    require_shared_output(cfg.out, "the sweep output")
    rio.makedirs(cfg.out)
    rio.remove(rio.join(cfg.out, "manifest.json"))
    bench = BenchmarkConfig(out=cfg.out, datasets=cfg.datasets, split=cfg.split,
                            methods=(), by_species=False)  # fmt: skip
    prepared = {d.name: prepare_dataset(d, bench, per_species=False) for d in cfg.datasets}
    cells = _grid(cfg, prepared)
    storage = rio.join(cfg.out, "tune")
    path = rio.join(storage, cfg.name)
    trainable = tune.with_resources(
        al_trial, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    )
    restored = tune.Tuner.can_restore(path)
    if restored:
        logger.info("sweep: resuming the experiment in %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                   param_space={"cell": tune.grid_search(cells)})  # fmt: skip
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search(cells)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=cfg.max_concurrent, trial_dirname_creator=trial_dirname
            ),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=storage, verbose=0,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            ),
        )  # fmt: skip
    try:
        grid = tuner.fit()
    except Exception as exc:  # noqa: BLE001 - e.g. the node ran out of memory mid-trial
        write_sweep_outputs(cfg, cells)  # the trials finished so far
        raise OutputError(
            f"the sweep stopped ({type(exc).__name__}: {str(exc)[:300]}); the trials finished "
            f"so far are in {cfg.out}/trials.csv. Run the same command again to resume it."
        ) from exc
    errors = [str(r.error) for r in grid if r.error is not None]
    outputs = write_sweep_outputs(cfg, cells)
    seconds = round(time.perf_counter() - t0, 1)
    counts = {"trials": len(cells), "errored": len(errors), "resumed": restored}
    write_run_record(cfg.out, "sweep", config=to_dict(cfg), counts=counts,
                     timings={"total_seconds": seconds}, outputs=outputs, errors=errors[:20],
                     cluster={"cpus": ray.cluster_resources().get("CPU")})  # fmt: skip
    return {"counts": counts, "outputs": outputs, "seconds": seconds, "errors": errors}
