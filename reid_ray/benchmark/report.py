"""The benchmark's outputs: the paper-style table (CSV + Markdown), a report per dataset and
a plot, all built from the cell records alone (so a resumed run writes the same files)."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from reid_ray import io as rio
from reid_ray.benchmark.cells import ALL
from reid_ray.benchmark.config import BenchmarkConfig

logger = logging.getLogger(__name__)

COLUMNS = ("dataset", "species", "method", "kind", "budget", "rerank", "per_species", "status",
           "top1", "top5", "mAP", "baks", "baus", "auroc", "threshold", "global_top1",
           "global_mAP", "query_rows", "query_unknown_rows", "gallery_rows", "eval_seconds",
           "embed_seconds", "rerank_seconds", "train_seconds", "cell_seconds")  # fmt: skip
MEASURES = (
    "top1/top5: fraction of known queries whose first correct gallery image is in the first "
    "1/5 candidates; mAP over known queries; BAKS/BAUS: balanced accuracy on known / unknown "
    "individuals at the known-vs-new threshold that evaluate fits on the gallery alone (no "
    "query looked at); AUROC: the top-1 score as a known-vs-new detector (query vs query_unknown rows); "
    "seconds: wall time on this cluster (embedding is shared between cells of one model, so "
    "the first cell of a model pays it)."
)


def table_rows(records: dict[str, list[dict[str, Any]]]) -> pd.DataFrame:
    """One row per dataset x species x cell."""
    rows = []
    for dataset, cells in records.items():
        for rec in cells:
            base = {k: rec.get(k) for k in ("dataset", "method", "kind", "budget", "rerank",
                                           "per_species", "status")}  # fmt: skip
            base["dataset"] = dataset
            base["method"] = rec.get("cell", rec.get("method"))
            if rec.get("status") != "done":
                rows.append({**base, "species": ALL})
                continue
            for species, r in rec.get("results", {}).items():
                train = rec.get("train", {}).get(species) or rec.get("train", {}).get(ALL) or {}
                counts, timings = r.get("counts", {}), r.get("timings", {})
                g = r.get("global") or {}
                rows.append({
                    **base, "species": species,
                    **{k: r.get(k) for k in ("top1", "top5", "mAP", "baks", "baus", "auroc",
                                             "threshold")},
                    "global_top1": g.get("top1"), "global_mAP": g.get("mAP"),
                    **{k: counts.get(k) for k in ("query_rows", "query_unknown_rows",
                                                  "gallery_rows")},
                    "eval_seconds": r.get("seconds"),
                    "embed_seconds": timings.get("embed_seconds"),
                    "rerank_seconds": timings.get("rerank_seconds"),
                    "train_seconds": (train.get("timings") or {}).get("total_s"),
                    "cell_seconds": rec.get("seconds"),
                })  # fmt: skip
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def paper_table(df: pd.DataFrame) -> str:
    """Rows dataset (species), columns methods; cells ``mAP / top-1`` and, in a second table,
    ``BAKS / BAUS / AUROC``."""
    methods = list(dict.fromkeys(df["method"]))
    keys = list(dict.fromkeys(zip(df["dataset"], df["species"], strict=True)))
    out = []
    for title, fmt in (
        ("mAP / top-1", lambda r: f"{_f(r['mAP'])} / {_f(r['top1'])}"),
        ("BAKS / BAUS / AUROC", lambda r: f"{_f(r['baks'])} / {_f(r['baus'])} / {_f(r['auroc'])}"),
    ):
        rows = []
        for dataset, species in keys:
            row = [dataset if species == ALL else f"{dataset} ({species})"]
            for m in methods:
                hit = df[
                    (df["dataset"] == dataset) & (df["species"] == species) & (df["method"] == m)
                ]
                if hit.empty:
                    row.append("")
                elif hit.iloc[0]["status"] != "done":
                    row.append(str(hit.iloc[0]["status"]))
                else:
                    row.append(fmt(hit.iloc[0]))
            rows.append(row)
        out.append(f"**{title}**\n\n" + _markdown(["dataset", *methods], rows))
    return "\n\n".join(out) + "\n\n" + MEASURES + "\n"


def dataset_report(name: str, info: dict[str, Any], cells: list[dict[str, Any]],
                   df: pd.DataFrame) -> str:  # fmt: skip
    """The per-dataset report: data, split, every cell's metrics, where the time went."""
    lines = [f"# Benchmark: {name}", ""]
    lines.append(f"- source: {info.get('source')}; {info.get('rows')} rows, "
                 f"{info.get('manifest_errors')} manifest errors")  # fmt: skip
    lines.append(f"- split: {info.get('split')}; cross-session: {info.get('cross_session')}; "
                 f"counts {info.get('split_counts')}; file {info.get('split_file')}")  # fmt: skip
    if info.get("species"):
        lines.append(f"- species: {', '.join(info['species'])}")
    lines += ["", "## Metrics", ""]
    sub = df[df["dataset"] == name]
    header = ["method", "species", "top-1", "top-5", "mAP", "BAKS", "BAUS", "AUROC",
              "global top-1", "global mAP"]  # fmt: skip
    rows = [[str(r["method"]), str(r["species"]), *(_f(r[k]) for k in ("top1", "top5", "mAP",
            "baks", "baus", "auroc", "global_top1", "global_mAP"))] for _, r in sub.iterrows()]  # fmt: skip
    lines += [_markdown(header, rows), "", "## Where the time goes (seconds)", ""]
    header = ["method", "species", "train", "embed", "re-rank", "evaluation", "cell"]
    rows = [[str(r["method"]), str(r["species"]), *(_f(r[k], 1) for k in ("train_seconds",
            "embed_seconds", "rerank_seconds", "eval_seconds", "cell_seconds"))]
            for _, r in sub.iterrows()]  # fmt: skip
    lines += [_markdown(header, rows), ""]
    trained = [(c["cell"], sp, t) for c in cells for sp, t in (c.get("train") or {}).items()]
    if trained:
        lines += ["## Training", ""]
        for cell, sp, t in trained:
            lines.append(f"- {cell} ({sp}): {t.get('epochs')} epochs on {t.get('train_images')} "
                         f"images of {t.get('train_identities')} individuals, best epoch "
                         f"{t.get('best_epoch')} (val mAP {_f(t.get('best_val_mAP'))}), "
                         f"{_f((t.get('timings') or {}).get('total_s'), 1)} s"
                         + (" (reused)" if t.get("reused") else ""))  # fmt: skip
        lines.append("")
    failed = [c for c in cells if c.get("status") != "done"]
    if failed:
        lines += ["## Cells failed or not run", ""]
        lines += [f"- {c['cell']}: {c['status']}; {c.get('reason', '')}" for c in failed]
        lines.append("")
    lines += [MEASURES, ""]
    return "\n".join(lines)


def dataset_panels(frame: pd.DataFrame, draw, path: str) -> bool:
    """One panel per dataset of ``frame`` (``draw(ax, rows, dataset)`` fills each), saved as
    a PNG at ``path`` (local or ``s3://``); False when there is nothing to draw."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if frame.empty:
        return False
    datasets = list(dict.fromkeys(frame["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        draw(ax, frame[frame["dataset"] == name], name)
        ax.set_title(name)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    rio.write_bytes_atomic(path, buf.getvalue())
    return True


def plot(df: pd.DataFrame, path: str) -> bool:
    """mAP per method, one panel per dataset (bars grouped by species)."""

    def draw(ax, sub: pd.DataFrame, _name: str) -> None:
        pivot = sub.pivot_table(index="method", columns="species", values="mAP", sort=False)
        pivot.plot.bar(ax=ax, rot=30)
        for label in ax.get_xticklabels():  # long method names end under their own bars
            label.set_horizontalalignment("right")
        ax.set_ylabel("mAP")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, title="species")

    return dataset_panels(df[df["status"] == "done"].dropna(subset=["mAP"]), draw, path)


def write_outputs(cfg: BenchmarkConfig, records: dict[str, list[dict[str, Any]]],
                  datasets: dict[str, dict[str, Any]]) -> dict[str, str]:  # fmt: skip
    """Write table.csv, table.md, reports/<dataset>.md and benchmark.png; their paths."""
    df = table_rows(records)
    out = cfg.out
    paths = {"table_csv": rio.join(out, "table.csv"), "table_md": rio.join(out, "table.md")}
    rio.write_bytes_atomic(paths["table_csv"], df.to_csv(index=False).encode())
    rio.write_bytes_atomic(paths["table_md"], paper_table(df).encode())
    for name, cells in records.items():
        path = rio.join(out, "reports", f"{name}.md")
        rio.write_bytes_atomic(path, dataset_report(name, datasets[name], cells, df).encode())
        paths[f"report_{name}"] = path
    if cfg.plots and plot(df, rio.join(out, "benchmark.png")):
        paths["plot"] = rio.join(out, "benchmark.png")
    return paths


def export_results(out: str, dest: str, *, note: str = "") -> dict[str, Any]:
    """Copy a finished benchmark's figures into ``dest.json`` / ``dest.md`` (e.g.
    ``benchmarks/results/benchmark_dogfacenet``): the table, the per-dataset reports, the
    cell records without bulky fields, the machine it ran on and ``note``."""
    import glob
    import os
    import platform

    record_path = rio.join(out, "manifest.json")
    record = rio.read_json(record_path) if rio.exists(record_path) else {"complete": False}
    cells = [rio.read_json(p) for p in sorted(glob.glob(os.path.join(out, "cells", "*", "*.json")))]
    for c in cells:
        c.pop("traceback", None)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "platform": platform.platform(), "load_average_at_export": os.getloadavg()}  # fmt: skip
    data = {"note": note, "machine": machine, "run": record, "cells": cells,
            "table": pd.read_csv(rio.join(out, "table.csv")).to_dict("records")}  # fmt: skip
    rio.write_json_atomic(f"{dest}.json", data)
    parts = [f"# Benchmark results ({os.path.basename(dest)})", "", note, "",
             rio.read_bytes(rio.join(out, "table.md")).decode()]  # fmt: skip
    for path in sorted(glob.glob(os.path.join(out, "reports", "*.md"))):
        parts += ["", rio.read_bytes(path).decode().replace("# Benchmark:", "## Dataset:", 1)]
    rio.write_bytes_atomic(f"{dest}.md", "\n".join(parts).encode())
    return data
