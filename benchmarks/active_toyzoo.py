r"""Active learning on toy zoos: usl vs random (any pairs) vs random_knn (k-NN pairs) vs
margin vs aas at one equal budget, averaged over seeds (each seed a different zoo and
sampler seed), with the spread.

    python benchmarks/active_toyzoo.py --seeds 0 1 2 3 4 --budget 0.5% --rounds 1 --epochs 4 \
        --size 128 --individuals 60 --images-per 8

Writes benchmarks/results/active_toyzoo.json (every run's metrics, the mean and standard
deviation per sampler, wall time per phase, the command) and active_toyzoo.png. The
starting model's evaluation and the round-0 embedding of a zoo are the same for every
sampler (same model, same rows), so they are computed once per zoo and copied: each
sampler's run then finds them done (the stages resume by id) and pays only for its own
clustering, sampling, refinement, training and evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time

from result_record import REPO, result_record, write_result  # benchmarks/ is on sys.path

SAMPLERS = ("usl", "random", "random_knn", "margin", "aas")
CEILING = "labels"  # the same fine-tune on the true identities of every train row
KEYS = ("mAP", "top1", "auroc", "baks", "baus", "nmi", "ari", "pair_precision", "pair_recall")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--samplers", nargs="+", default=[*SAMPLERS, CEILING],
                   help=f"AL samplers, and {CEILING!r}: the fine-tune on all true labels "
                   "(what the best pseudo-labels could give)")  # fmt: skip
    p.add_argument("--budget", default="0.5%")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--head-warmup-epochs", type=float, default=1.0,
                   help="epochs training only the neck and head first (TrainConfig)")  # fmt: skip
    p.add_argument("--train-sampler", choices=("pk", "random"), default="pk",
                   help="batches of P identities x 4 images, or shuffled rows (TrainConfig)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="images per worker and step")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per fine-tune")
    p.add_argument("--size", type=int, default=128, help="input side of the models (px)")
    p.add_argument("--zoo-size", type=int, help="side of the generated images (default: --size)")
    p.add_argument("--individuals", type=int, default=60)
    p.add_argument("--images-per", type=int, default=8)
    p.add_argument("--model", default="timm:efficientnet_lite0")
    p.add_argument("--start-zoo", type=int, metavar="SEED",
                   help="start every run from --model trained on the true identities of "
                   "another zoo of the same species (this seed; its own individuals): last "
                   "season's model meeting this season's animals")  # fmt: skip
    p.add_argument("--start-epochs", type=int, default=12, help="epochs of that training")
    p.add_argument("--work", default="/tmp/reid-ray-al-bench")
    p.add_argument(
        "--out", default=os.path.join(REPO, "benchmarks", "results", "active_toyzoo.json")
    )
    p.add_argument("--retries", type=int, default=2, help="Reruns of a crashed run (it resumes).")
    p.add_argument("--merge", nargs="+", help="Only merge the runs of these result files.")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.merge:
        parts = [json.load(open(path)) for path in args.merge]
        runs = [r for part in parts for r in part["runs"]]
        args.seeds = sorted({r["seed"] for r in runs})
        made_by = [{k: part.get(k) for k in ("command", "created", "machine")} for part in parts]
        _write(args, runs, merged_from=made_by)
        return

    from reid_ray.active.runner import run_al
    from reid_ray.runtime import init_ray
    from reid_ray.synth import generate_zoo

    for attempt in range(3):  # a loaded machine can time out starting Ray
        try:
            init_ray()
            break
        except Exception:
            logging.exception("Ray did not start (attempt %d)", attempt)
            if attempt == 2:
                raise
            import ray

            ray.shutdown()
            time.sleep(20)
    if args.start_zoo is not None:
        args.model = _pretrain(args, generate_zoo)
    runs = []
    for seed in args.seeds:
        zoo = os.path.join(args.work, f"zoo{seed}")
        if not os.path.exists(os.path.join(zoo, "split.csv")):
            generate_zoo(zoo, individuals=args.individuals, images_per=args.images_per,
                         size=args.zoo_size or args.size, seed=seed, split_kind="disjoint")  # fmt: skip
        first = None
        for sampler in args.samplers:
            out = os.path.join(args.work, f"seed{seed}-{sampler}")
            if sampler == CEILING:
                runs.append(_ceiling(args, zoo, seed, out))
                _write(args, runs)
                continue
            cfg = _al_config(args, zoo, seed, sampler, out)
            if first is not None and not os.path.exists(os.path.join(out, "start")):
                shutil.copytree(os.path.join(first, "start"), os.path.join(out, "start"))
                shutil.copytree(os.path.join(first, "rounds", "r0", "embed"),
                                os.path.join(out, "rounds", "r0", "embed"))  # fmt: skip
            t = time.perf_counter()
            for attempt in range(args.retries + 1):
                try:  # a run killed by the machine (OOM) resumes where it stopped
                    m = run_al(cfg)
                    break
                except Exception:
                    logging.exception("seed %d %s failed (attempt %d)", seed, sampler, attempt)
                    if attempt == args.retries:
                        raise
            first = first or out
            runs.append({
                "seed": seed, "sampler": sampler, "wall_s": round(time.perf_counter() - t, 1),
                "start": m["start"], "pairs": m["budget_pairs"],
                **{k: m["rounds"][-1].get(k) for k in KEYS},
                "rounds": [{k: r.get(k) for k in ("round", "annotations", "answers", "mAP",
                            "top1", "nmi", "ari", "pair_precision", "pair_recall", "refine",
                            "clusters", "noise", "seconds")} for r in m["rounds"]],
            })  # fmt: skip
            print(f"seed {seed} {sampler}: mAP {m['mAP']:.3f} top1 {m['top1']:.3f} "
                  f"ari {m['ari']:.3f} ({runs[-1]['wall_s']} s)", flush=True)  # fmt: skip
            _write(args, runs)


def _al_config(args, zoo: str, seed: int, sampler: str, out: str):
    from reid_ray.active.config import load_al_config

    return load_al_config({
        "manifest": os.path.join(zoo, "metadata.csv"), "split": os.path.join(zoo, "split.csv"),
        "out": out, "model": args.model, "sampler": sampler, "budget": args.budget,
        "rounds": args.rounds, "seed": seed, "image_size": args.size,
        "train": {"epochs": args.epochs, "workers": args.workers,
                  "cpus_per_worker": 1.0 if args.workers == 1 else None,
                  "batch_size": args.batch_size, "sampler": args.train_sampler, "pk_k": 4,
                  "head_warmup_epochs": args.head_warmup_epochs},
    })  # fmt: skip


def _pretrain(args, generate_zoo) -> str:
    """The starting checkpoint of ``--start-zoo``: trained on that zoo's train rows with its
    val rows choosing the epoch (resumes; the same for every seed and sampler)."""
    from reid_ray.train import TrainConfig, train

    zoo = os.path.join(args.work, f"start-zoo{args.start_zoo}")
    if not os.path.exists(os.path.join(zoo, "split.csv")):
        generate_zoo(zoo, individuals=args.individuals, images_per=args.images_per,
                     size=args.zoo_size or args.size, seed=args.start_zoo, split_kind="disjoint")  # fmt: skip
    cfg = TrainConfig(model=args.model, image_size=args.size, epochs=args.start_epochs,
                      workers=args.workers, cpus_per_worker=1.0 if args.workers == 1 else None,
                      batch_size=args.batch_size, sampler=args.train_sampler,
                      seed=args.start_zoo)  # fmt: skip
    summary = train(os.path.join(zoo, "metadata.csv"), os.path.join(zoo, "train"),
                    split_path=os.path.join(zoo, "split.csv"), config=cfg, resume=True)  # fmt: skip
    print(f"start model: {summary['checkpoint']} (zoo seed {args.start_zoo}, best epoch "
          f"{summary.get('best_epoch')})", flush=True)  # fmt: skip
    return summary["checkpoint"]


def _ceiling(args, zoo: str, seed: int, out: str) -> dict:
    """The AL fine-tune's settings trained on the true identities of all train rows: the
    most any pseudo-labels could give (the same epochs, no validation rows)."""
    from reid_ray import io as rio
    from reid_ray.data import read_manifest
    from reid_ray.evaluation import evaluate
    from reid_ray.train import train

    cfg = _al_config(args, zoo, seed, "usl", out)
    t = time.perf_counter()
    table = read_manifest(cfg.manifest, cfg.split).table.to_pandas()
    rows = table[table["split"] == "train"][["image_id", "path", "identity", "bbox"]].copy()
    # the boxes too: training on whole images and testing on the boxes is another task
    rows["bbox"] = [",".join(f"{v:g}" for v in b) if b is not None else "" for b in rows["bbox"]]
    manifest = os.path.join(out, "labels.csv")
    rio.write_bytes_atomic(manifest, rows.to_csv(index=False).encode())
    summary = train(manifest, os.path.join(out, "train"), config=cfg.train_config(cfg.model),
                    resume=True)  # fmt: skip
    m = evaluate(cfg.manifest, cfg.split, summary["checkpoint"], os.path.join(out, "eval"),
                 command="al")  # fmt: skip
    print(f"seed {seed} {CEILING}: mAP {m['mAP']:.3f} top1 {m['top1']:.3f}", flush=True)
    return {"seed": seed, "sampler": CEILING, "wall_s": round(time.perf_counter() - t, 1),
            "start": None, "pairs": None, "train_images": len(rows),
            **{k: m.get(k) for k in KEYS if k in m}}  # fmt: skip


def _stats(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "n": len(vals)}


def _write(args, runs, **extra) -> None:
    summary = {}
    for sampler in args.samplers:
        mine = [r for r in runs if r["sampler"] == sampler]
        if mine:
            summary[sampler] = {k: _stats([r.get(k) for r in mine]) for k in KEYS}
            summary[sampler]["pairs"] = _stats([r["pairs"] for r in mine])
            if sampler == CEILING:
                summary[sampler]["wall_s"] = _stats([r["wall_s"] for r in mine])
                continue
            phases = mine[0]["rounds"][0]["seconds"]
            summary[sampler]["seconds_per_round"] = {
                ph: _stats([r2["seconds"][ph] for r in mine for r2 in r["rounds"]]) for ph in phases
            }
    starts = [r["start"] for r in runs if r["sampler"] == args.samplers[0] and r.get("start")]
    summary["start"] = {k: _stats([s.get(k) for s in starts]) for k in ("mAP", "top1", "auroc")}
    result = result_record(
        args,
        "mAP/top1 on query vs gallery, auroc known (query) vs unknown (query_unknown) by "
        "top-1 similarity, after the last round's fine-tune; nmi/ari/pair_* of the refined "
        "pseudo-labels of the train rows against the hidden identities; mean and population "
        f"std over runs (seeds, and repeats when merged); seconds per round by phase; {CEILING!r}: the same fine-tune on the "
        "true identities of every train row (the ceiling of any pseudo-labels)",
        **extra,
        summary=summary,
        runs=runs,
    )
    write_result(args.out, result)
    _plot(args, summary)


def _plot(args, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in args.samplers if s in summary]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key in zip(axes, ("mAP", "top1", "ari"), strict=True):
        means = [(summary[s][key] or {}).get("mean", 0) for s in names]
        stds = [(summary[s][key] or {}).get("std", 0) for s in names]
        ax.bar(names, means, yerr=stds, capsize=4, color="#7aa6c2")
        if key in summary["start"] and summary["start"][key]:
            ax.axhline(summary["start"][key]["mean"], color="k", ls="--", lw=1, label="start")
            ax.legend()
        ax.set_title(f"{key} (mean ± std over runs)" if key != "ari" else "pseudo-label ARI")
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(
        f"toy zoo AL, budget {args.budget}, {args.rounds} round(s), {args.epochs} epoch(s)"
    )
    fig.tight_layout()
    fig.savefig(args.out.replace(".json", ".png"), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
