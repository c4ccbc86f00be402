"""USL and AL cells: one ``reid_ray.active.run_al`` run on a dataset's split.

USL is the AL run with no annotations (budget 0): pseudo-labels from the complementary
clusterings alone, then fine-tuning. An AL cell asks the simulated oracle for ``budget``
pairs (a fraction of all pairs of the train rows, ``"0.033%"``, or a count). Each run keeps
its rounds under ``OUT/work/<dataset>/active/<cell>`` and resumes there.
"""

from __future__ import annotations

from typing import Any

from reid_ray import io as rio
from reid_ray.benchmark.config import BenchmarkConfig, MethodSpec
from reid_ray.benchmark.datasets import PreparedDataset

ALL = "all"


def run_active_cell(ds: PreparedDataset, method: MethodSpec, cfg: BenchmarkConfig,
                    budget: float | str | None, work: str) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """One USL (no annotations) or AL run; ``(results, training)`` keyed by species."""
    from reid_ray.active import load_al_config, run_al

    usl = method.kind == "usl"
    budget = "0" if usl else str(budget)
    name = method.name if usl else f"{method.name}@{budget}"
    # a USL cell is recorded (and logged) as sampler "usl", whatever its al settings say
    settings = {"evaluate_start": False, **method.al, **({"sampler": "usl"} if usl else {})}
    al_cfg = load_al_config(
        settings,
        {"manifest": ds.manifest, "split": ds.split, "model": method.model, "budget": budget,
         "image_size": method.image_size, "out": rio.join(work, "active", name)},
    )  # fmt: skip
    metrics = run_al(al_cfg)
    result = {key: metrics.get(key) for key in ("top1", "top5", "mAP", "baks", "baus", "auroc")}
    phases = metrics.get("seconds_by_phase", {})
    result.update(
        seconds=metrics.get("total_seconds"),
        timings={"embed_seconds": phases.get("embed"), **phases},
        counts={"pairs_asked": metrics.get("budget_pairs"), "rounds": len(metrics["rounds"])},
        nmi=metrics.get("nmi"),
        ari=metrics.get("ari"),
        eval_dir=al_cfg.out,
    )
    training = {
        "checkpoint": al_cfg.out,
        "epochs": None,
        "rounds": len(metrics["rounds"]),
        "pairs_asked": metrics.get("budget_pairs"),
        "timings": {"total_s": metrics.get("total_seconds")},
    }
    return {ALL: result}, {ALL: training}
