"""``reid-ray benchmark``: the command function (registered by ``reid_ray.cli``).

``jobs/benchmark_datasets.py`` runs this same function, so the job and the command take the
same options. Light at import time.
"""

from __future__ import annotations

import typer


def benchmark_command(
    config: str = typer.Option(
        ..., help="Benchmark config (YAML/JSON; e.g. jobs/configs/benchmark_toyzoos.yaml)."
    ),
    out: str | None = typer.Option(None, help="Output folder (overrides the config's out)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a setting, KEY=VALUE (e.g. --set split.seed=1); repeatable."
    ),
    report_only: bool = typer.Option(
        False, help="Run nothing: write the tables from the cells finished so far."
    ),
) -> None:
    """Each configured method on each dataset: the paper-style table (CSV + Markdown), a
    report per dataset, the split files used. Resumable: finished cells are not redone."""
    from reid_ray.benchmark import load_benchmark_config, run_benchmark
    from reid_ray.console import metrics_table, progress, summary

    overrides = list(set_) + ([f"out={out}"] if out else [])
    cfg = load_benchmark_config(config, overrides)
    with progress() as update:
        result = run_benchmark(
            cfg,
            progress=lambda _cell, done, total: update("cells", done, total),
            report_only=report_only,
        )
    rows = []
    for dataset, cells in result["records"].items():
        for rec in cells:
            r = (rec.get("results") or {}).get("all") or next(
                iter((rec.get("results") or {}).values()), {}
            )
            rows.append([dataset, rec["cell"], rec["status"],
                         *(r.get(k) for k in ("top1", "mAP", "baks", "baus", "auroc")),
                         rec.get("seconds")])  # fmt: skip
    metrics_table(
        "benchmark (whole dataset; per species in the table)",
        ["dataset", "method", "status", "top-1", "mAP", "BAKS", "BAUS", "AUROC", "seconds"],
        rows,
    )
    c = result["counts"]
    summary(
        "benchmark",
        [
            ("cells", f"{c['cells']} ({c['run']} run, {c['done_before']} finished before, "
                      f"{c['failed']} failed)"),
            ("table", f"{result['outputs']['table_md']} and table.csv"),
            ("time", f"{result['seconds']:.0f} s"),
        ],
    )  # fmt: skip


def sweep_command(
    config: str = typer.Option(
        ..., help="Sweep config (YAML/JSON; e.g. jobs/configs/sweep_toyzoos.yaml)."
    ),
    out: str | None = typer.Option(None, help="Output folder (overrides the config's out)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a setting, KEY=VALUE (e.g. --set max_concurrent=2)."
    ),
) -> None:
    """Ray Tune sweep of active-learning runs over datasets x samplers x budgets x seeds:
    one table (mean and spread over seeds) and mAP-vs-budget plots. Resumes when
    interrupted: finished trials are not redone."""
    from reid_ray.benchmark.sweep import load_sweep_config, run_sweep
    from reid_ray.console import summary

    overrides = list(set_) + ([f"out={out}"] if out else [])
    result = run_sweep(load_sweep_config(config, overrides))
    c = result["counts"]
    summary(
        "sweep",
        [
            ("trials", f"{c['trials']} ({c['errored']} errored; resumed: {c['resumed']})"),
            ("table", f"{result['outputs']['sweep.md']} and sweep.csv, trials.csv"),
            ("plot", result["outputs"].get("sweep.png", "-")),
            ("time", f"{result['seconds']:.0f} s"),
        ],
    )
    if result["errors"]:
        summary("first errors", [(str(i), e[:200]) for i, e in enumerate(result["errors"][:3])])
