"""Copy a finished ``reid-ray benchmark`` (or ``reid-ray sweep``) output folder's results into
``benchmarks/results/``: the tables, the plot and the cells' records as one JSON, with a note
on how they were produced and the machine they ran on.

    python benchmarks/export_benchmark.py /work/data/bench-dogfacenet --name benchmark_dogfacenet \
        --note "DogFaceNet ... (how the data was built, what shared the machine)"

The output folders themselves stay outside the repository (they hold images and models).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import pandas as pd
from result_record import machine  # benchmarks/ is on sys.path

from reid_ray import io as rio

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _read(path: str) -> str:
    return rio.read_bytes(path).decode()


def benchmark_record(out: str) -> tuple[dict, str, str]:
    """A benchmark folder: its run record, every cell, and the long table."""
    cells = [rio.read_json(p) for p in sorted(glob.glob(os.path.join(out, "cells", "*", "*.json")))]
    run = rio.read_json(os.path.join(out, "manifest.json"))
    table = pd.read_csv(os.path.join(out, "table.csv"))
    return (
        {
            "run": run,
            "cells": cells,
            "table": json.loads(table.to_json(orient="records")),
        },
        _read(os.path.join(out, "table.md")),
        os.path.join(out, "benchmark.png"),
    )


def sweep_record(out: str) -> tuple[dict, str, str]:
    """A sweep folder: every trial and the mean/spread summary."""
    trials = pd.read_csv(os.path.join(out, "trials.csv"))
    summary = pd.read_csv(os.path.join(out, "sweep.csv"))
    return (
        {
            "trials": json.loads(trials.to_json(orient="records")),
            "summary": json.loads(summary.to_json(orient="records")),
            "finished": int(trials["finished"].sum()),
            "total": len(trials),
        },
        _read(os.path.join(out, "sweep.md")),
        os.path.join(out, "sweep.png"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the benchmark's or sweep's out folder (local)")
    parser.add_argument("--name", required=True, help="file stem under benchmarks/results/")
    parser.add_argument("--note", default="", help="how the run was made; quoted in the files")
    args = parser.parse_args()
    is_sweep = os.path.exists(os.path.join(args.out, "trials.csv"))
    needed = ("trials.csv", "sweep.csv", "sweep.md") if is_sweep else (
        "manifest.json", "table.csv", "table.md")  # fmt: skip
    missing = [n for n in needed if not os.path.exists(os.path.join(args.out, n))]
    if missing:
        parser.error(
            f"{args.out} is not a finished benchmark or sweep folder: no {', '.join(missing)}"
        )
    record, table_md, png = (sweep_record if is_sweep else benchmark_record)(args.out)
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, args.name)
    with open(stem + ".json", "w") as f:
        json.dump({"note": args.note, "machine": machine(), **record}, f, indent=2)
    title = "Sweep" if is_sweep else "Benchmark"
    with open(stem + ".md", "w") as f:
        f.write(f"# {title} results ({args.name})\n\n{args.note}\n\n{table_md}")
    if os.path.exists(png):
        shutil.copyfile(png, stem + ".png")
    print("wrote", ", ".join(p for p in (stem + ".json", stem + ".md", stem + ".png")
                             if os.path.exists(p)))  # fmt: skip


if __name__ == "__main__":
    main()
