"""The benchmark job: every configured method on every dataset, resumable cell by cell.

Layout of ``OUT`` (local or ``s3://``)::

    splits/<dataset>[.<species>].csv   the split files used (seeded; identical on every machine)
    data/<dataset>/                    toy zoos generated, wildlife tables converted
    work/<dataset>/                    embeddings, features, checkpoints shared between cells
    cells/<dataset>/<cell>.json        one finished cell (written last, atomically)
    table.csv, table.md                the paper-style table
    reports/<dataset>.md               the per-dataset report (metrics, timings, training)
    benchmark.png                      mAP per method, one panel per dataset
    manifest.json                      the run record (config, counts, timings), written last

A finished cell is not redone: a rerun reads its JSON, unless the method's settings or the
dataset's split changed (its fingerprint). A cell that fails is recorded with its reason and
the job goes on; a rerun retries it.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

from reid_ray import io as rio
from reid_ray.benchmark.cells import run_cell, short_hash
from reid_ray.benchmark.config import BenchmarkConfig, MethodSpec
from reid_ray.benchmark.datasets import PreparedDataset, prepare_dataset
from reid_ray.config import to_dict

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def cell_names(method: MethodSpec) -> list[tuple[str, float | str | None]]:
    """The cells of a method: one, or one per AL budget (``NAME@BUDGET``)."""
    if method.kind == "al":
        return [(f"{method.name}@{b}", b) for b in method.budgets]
    return [(method.name, None)]


def cell_path(out: str, dataset: str, cell: str) -> str:
    return rio.join(out, "cells", dataset, f"{cell}.json")


def cell_fingerprints(ds: PreparedDataset, method: MethodSpec, cfg: BenchmarkConfig,
                      budget: float | str | None) -> tuple[str, str]:  # fmt: skip
    """What decides a cell's result: the method's settings, the cell's budget, the split
    files, k, by_species. Returns ``(fingerprint, legacy)``: the first leaves the method's
    list of budgets out, so adding a budget does not redo the cells of the others; the
    second includes it, as cells recorded before 2026-12-05 were (still accepted)."""
    settings = to_dict(method)
    splits = {sp: rio.read_bytes(p).decode() for sp, p in ds.species_splits.items()}
    rest = [budget, ds.fingerprint, short_hash(splits), cfg.k, cfg.by_species]
    legacy = short_hash([settings, *rest])
    settings.pop("budgets", None)
    return short_hash([settings, *rest]), legacy


def finished_cell(
    path: str, fingerprint: str, legacy: str | None = None, *, rewrite: bool = True
) -> dict[str, Any] | None:
    """The cell's record if it finished with ``fingerprint``; one recorded with ``legacy``
    is finished too, and (``rewrite``) its record is rewritten with ``fingerprint``, so the
    method's budgets can change afterwards without redoing it. The legacy fingerprint is
    made from today's list of budgets: change the list only after one run has rewritten
    the records, or the old cells are redone."""
    if not rio.exists(path):
        return None
    record = rio.read_json(path)
    if record.get("status") != "done":
        return None
    if record.get("fingerprint") == fingerprint:
        return record
    if legacy is not None and record.get("fingerprint") == legacy:
        if rewrite:
            record["fingerprint"] = fingerprint
            rio.write_json_atomic(path, record)
        return record
    return None


def run_benchmark(
    cfg: BenchmarkConfig, *, progress: Progress | None = None, report_only: bool = False
) -> dict[str, Any]:
    """Run (or resume) the benchmark; writes the tables and reports; returns the summary.

    ``report_only``: run nothing, write the tables from the cells finished so far (the
    others are listed as ``not run``): a look at a long run while it is going on.
    """
    from reid_ray.benchmark.report import write_outputs
    from reid_ray.parts import write_run_record
    from reid_ray.runtime import init_ray, require_shared_output

    t0 = time.perf_counter()
    if not report_only:
        init_ray(cfg.ray_address, cfg.num_cpus)
        require_shared_output(cfg.out, "the benchmark output")
        rio.makedirs(cfg.out)
        rio.remove(rio.join(cfg.out, "manifest.json"))
    per_species = cfg.by_species or any(m.per_species for m in cfg.methods)
    cells = [(m, c, b) for m in cfg.methods for c, b in cell_names(m)]
    total = len(cfg.datasets) * len(cells)
    counts = {"cells": total, "done_before": 0, "run": 0, "failed": 0}
    records: dict[str, list[dict[str, Any]]] = {}
    datasets: dict[str, dict[str, Any]] = {}
    n = 0
    for spec in cfg.datasets:
        ds = prepare_dataset(spec, cfg, per_species=per_species)
        datasets[ds.name] = {**ds.info, "split_file": ds.split, "species_splits": ds.species_splits}
        records[ds.name] = []
        for method, cell, budget in cells:
            path = cell_path(cfg.out, ds.name, cell)
            fingerprint, legacy = cell_fingerprints(ds, method, cfg, budget)
            record = finished_cell(path, fingerprint, legacy, rewrite=not report_only)
            if record is not None:
                counts["done_before"] += 1
                logger.info("benchmark %s / %s: finished before, skipped", ds.name, cell)
            elif report_only:
                record = {"dataset": ds.name, "cell": cell, "method": method.name,
                          "kind": method.kind, "status": "not run"}  # fmt: skip
            else:
                record = _run_and_record(ds, method, cfg, cell, budget, fingerprint, path)
                counts["run"] += 1
                counts["failed"] += record["status"] != "done"
            records[ds.name].append(record)
            n += 1
            if progress:
                progress(f"{ds.name} / {cell}", n, total)
        write_outputs(cfg, records, datasets)  # the tables so far, after every dataset
    outputs = write_outputs(cfg, records, datasets)
    seconds = round(time.perf_counter() - t0, 1)
    if report_only:
        return {"counts": counts, "outputs": outputs, "seconds": seconds, "records": records,
                "datasets": datasets}  # fmt: skip
    write_run_record(
        cfg.out, "benchmark", config=to_dict(cfg), counts=counts,
        timings={"total_seconds": seconds}, outputs=outputs, datasets=datasets,
    )  # fmt: skip
    return {"counts": counts, "outputs": outputs, "seconds": seconds, "records": records,
            "datasets": datasets}  # fmt: skip


def _run_and_record(ds: PreparedDataset, method: MethodSpec, cfg: BenchmarkConfig, cell: str,
                    budget: float | str | None, fingerprint: str, path: str) -> dict[str, Any]:  # fmt: skip
    """Run one cell and write its record; a failure is recorded, not raised."""
    logger.info("benchmark %s / %s: running", ds.name, cell)
    base = {
        "dataset": ds.name,
        "cell": cell,
        "method": method.name,
        "kind": method.kind,
        "budget": budget,
        "rerank": method.rerank is not None,
        "per_species": method.per_species,
        "fingerprint": fingerprint,
        "method_config": to_dict(method),
    }
    t = time.perf_counter()
    try:
        result = run_cell(ds, method, cfg, budget)
        record = {**base, "status": "done", **result}
    except Exception as exc:  # noqa: BLE001 - one failed cell must not stop the job
        logger.error("benchmark %s / %s failed: %s", ds.name, cell, exc)
        record = {
            **base,
            "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
            "seconds": round(time.perf_counter() - t, 2),
        }
    rio.write_json_atomic(path, record)
    return record
