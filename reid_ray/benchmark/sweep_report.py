"""The sweep's tables and plot, read from each AL run's own ``metrics.json`` (so they are the
same whether the sweep ran in one go or was interrupted and resumed)."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from reid_ray import io as rio

logger = logging.getLogger(__name__)

MEASURE = (
    "Each row: mean and standard deviation over seeds of the final AL round, measured with "
    "the benchmark protocol (reid_ray.evaluation.evaluate) on the query/gallery/query_unknown "
    "rows; auroc: top-1 similarity separating known from unknown queries; pairs: oracle "
    "answers used; budget: share of all pairs of the train rows (or a count)."
)


def trial_rows(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial: its settings and, when finished, its metrics."""
    from reid_ray.active import parse_budget

    rows = []
    for cell in cells:
        run = cell["run"]
        path = rio.join(run["out"], "metrics.json")
        m = rio.read_json(path) if rio.exists(path) else {}
        rows.append({
            "dataset": cell["dataset"], "sampler": run["sampler"], "budget": run["budget"],
            "budget_value": float(parse_budget(run["budget"])), "seed": run["seed"],
            "finished": bool(m),
            **{k: m.get(k) for k in ("mAP", "top1", "top5", "auroc", "baks", "baus", "nmi", "ari")},
            "pairs": m.get("budget_pairs"), "seconds": m.get("total_seconds"),
        })  # fmt: skip
    return pd.DataFrame(rows)


def summarise(trials: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds per dataset x sampler x budget (finished trials only)."""
    done = trials[trials["finished"]]
    keys = ["dataset", "sampler", "budget", "budget_value"]
    if done.empty:
        return pd.DataFrame(columns=[*keys, "seeds"])
    grouped = done.groupby(keys, sort=False)
    out = grouped.size().rename("seeds").reset_index()
    for metric in ("mAP", "top1", "auroc", "pairs"):
        stats = grouped[metric].agg(["mean", "std"]).reset_index(drop=True)
        out[f"{metric}_mean"] = stats["mean"].to_numpy()
        out[f"{metric}_std"] = stats["std"].fillna(0.0).to_numpy()
    return out.sort_values(["dataset", "sampler", "budget_value"]).reset_index(drop=True)


def markdown(summary: pd.DataFrame) -> str:
    def pm(row, metric: str) -> str:
        mean = row[f"{metric}_mean"]
        return "-" if pd.isna(mean) else f"{mean:.3f} ± {row[f'{metric}_std']:.3f}"

    lines = ["| dataset | sampler | budget | seeds | mAP | top-1 | AUROC | pairs |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for _, r in summary.iterrows():
        pairs = "-" if pd.isna(r["pairs_mean"]) else f"{r['pairs_mean']:.0f}"
        lines.append(f"| {r['dataset']} | {r['sampler']} | {r['budget']} | {r['seeds']} | "
                     f"{pm(r, 'mAP')} | {pm(r, 'top1')} | {pm(r, 'auroc')} | {pairs} |")  # fmt: skip
    return "\n".join(lines) + "\n\n" + MEASURE + "\n"


def plot(summary: pd.DataFrame, path: str) -> bool:
    """mAP vs budget, one line per sampler (error bars: spread over seeds), one panel per
    dataset."""
    from reid_ray.benchmark.report import dataset_panels

    def draw(ax, sub: pd.DataFrame, _name: str) -> None:
        for sampler, g in sub.groupby("sampler", sort=True):
            ax.errorbar(g["budget_value"], g["mAP_mean"], yerr=g["mAP_std"], marker="o",
                        capsize=3, label=sampler)  # fmt: skip
        budgets = sorted(set(sub["budget_value"].tolist()))
        if budgets and budgets[0] > 0 and budgets[-1] < 1:  # shares of all pairs
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(budgets, [f"{100 * v:g}%" for v in budgets])
        ax.set_xlabel("budget (share of train pairs)")
        ax.set_ylabel("mAP")
        ax.legend(title="sampler", fontsize=8)

    return dataset_panels(summary, draw, path)


def write_sweep_outputs(cfg, cells: list[dict[str, Any]]) -> dict[str, str]:
    """trials.csv, sweep.csv, sweep.md and sweep.png under ``cfg.out``; their paths."""
    trials = trial_rows(cells)
    summary = summarise(trials)
    paths = {name: rio.join(cfg.out, name) for name in ("trials.csv", "sweep.csv", "sweep.md")}
    rio.write_bytes_atomic(paths["trials.csv"], trials.to_csv(index=False).encode())
    rio.write_bytes_atomic(paths["sweep.csv"], summary.to_csv(index=False).encode())
    rio.write_bytes_atomic(paths["sweep.md"], markdown(summary).encode())
    if plot(summary, rio.join(cfg.out, "sweep.png")):
        paths["sweep.png"] = rio.join(cfg.out, "sweep.png")
    return paths
