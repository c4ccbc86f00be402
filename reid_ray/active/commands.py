"""``reid-ray al``: one active-learning run (registered by ``reid_ray.cli``), or, with
``--annotate DIR``, the local annotation page for a round's pairs. Light at import time."""

from __future__ import annotations

import shlex
import sys

import typer

EXIT_ANSWERS_NEEDED = 3  # = reid_ray.active.runner.EXIT_ANSWERS_NEEDED (kept light here)


def al_command(
    manifest: str = typer.Option("", help="Manifest (CSV or Parquet; local path or s3://)."),
    split: str = typer.Option(
        None, help="Split file (image_id,split); default: the manifest's split column."
    ),
    out: str = typer.Option("", help="Output folder (rounds/, metrics.json, al.png)."),
    model: str = typer.Option(
        None, help="Starting model: timm:NAME, hf-hub:ORG/NAME or a checkpoint."
    ),
    sampler: str = typer.Option(
        None,
        help="usl (no answers), random (any pairs), random_knn (k-NN pairs), margin or "
        "aas (ambiguity-aware).",
    ),
    budget: str = typer.Option(
        None,
        help="Pairs to ask in all: a count (default 1000) or, to compare with the AAS paper, "
        "a fraction of all train pairs (0.033%).",
    ),
    rounds: int = typer.Option(
        None, min=1, help="Rounds (cycles); the budget is spread over them."
    ),
    oracle: str = typer.Option(
        None,
        help="simulated (answers from the hidden identities: benchmarks) or human (a person "
        "answers on the --annotate page; the command waits between sittings).",
    ),
    accept_partial: bool = typer.Option(
        False,
        help="--oracle human: go on with the pairs answered so far (the rest are asked "
        "again later and spend no budget).",
    ),
    evaluate: bool = typer.Option(
        None,
        "--evaluate/--no-evaluate",
        help="Score each round on labelled query/gallery rows (default: when there are any).",
    ),
    seed: int = typer.Option(None, help="Seed of the samplers and training."),
    image_size: int = typer.Option(None, help="Input side of the starting model in px."),
    epochs: int = typer.Option(None, min=1, help="Fine-tuning epochs per round."),
    config: str = typer.Option(
        None, help="YAML/JSON config (jobs/configs/al_toyzoo.yaml); options win."
    ),
    overwrite: bool = typer.Option(False, help="Start over in an --out holding another run."),
    annotate: str = typer.Option(
        None, help="Serve the annotation page for this pairs folder instead."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="--annotate: address to bind (the page has no login)."
    ),
    port: int = typer.Option(8765, help="--annotate: port."),
) -> None:
    """Active learning: rounds of embed, cluster, ask about ambiguous pairs, refine,
    fine-tune (and evaluate, when the split has labelled query/gallery rows).

    On your own unlabelled images (no identity column needed), with a person answering:
    `reid-ray al --manifest M --out OUT --oracle human --budget 500 --rounds 2` writes a
    round's pairs and exits with status 3 ("waiting for answers"); answer them on
    `reid-ray al --annotate OUT` (http://127.0.0.1:8765/, keys s/d/u/k, f frames, z zoom),
    in as many sittings as you like, and run the same command again after each: it goes on
    once every pair is answered. The result: OUT/pseudo_labels.csv (a provisional identity
    per image) and OUT/constraints.csv (the answers behind it), for `reid-ray train` and
    `reid-ray gallery build`. Exit status: 0 done, 3 waiting for answers, 2 bad input.
    """
    from reid_ray.console import console, summary

    if annotate:
        from reid_ray.active.annotate import serve

        def announce(folder: str, url: str) -> None:
            console().print(f"annotation page for {folder} on {url} (Ctrl-C stops)")

        serve(annotate, host=host, port=port, announce=announce)
        return

    from reid_ray.active.config import load_al_config
    from reid_ray.active.report import print_table
    from reid_ray.active.runner import AnswersNeeded, run_al

    overrides = {
        "manifest": manifest or None, "split": split, "out": out or None, "model": model,
        "sampler": sampler, "budget": budget, "rounds": rounds, "oracle": oracle, "seed": seed,
        "image_size": image_size, "evaluate": evaluate,
    }  # fmt: skip
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = load_al_config(config, overrides)
    if epochs is not None:
        cfg = load_al_config(cfg, {"train": {**cfg.train, "epochs": epochs}})
    if not cfg.manifest or not cfg.out:
        raise typer.BadParameter("--manifest and --out are needed (or a --config naming them)")
    rerun = "reid-ray " + shlex.join(["al", *sys.argv[2:]]) if sys.argv[1:2] == ["al"] else None
    try:
        metrics = run_al(cfg, overwrite=overwrite, accept_partial=accept_partial, rerun=rerun)
    except AnswersNeeded as waiting:  # a normal outcome: the person answers, then reruns
        console().print(f"waiting for answers: {waiting.status}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_ANSWERS_NEEDED) from None
    print_table(metrics)
    final = (
        f"top1 {metrics['top1']:.3f}  mAP {metrics['mAP']:.3f}"
        if metrics.get("mAP") is not None
        else f"not evaluated ({metrics['evaluation']})"
    )
    summary(
        "al",
        [
            ("sampler", f"{cfg.sampler}, budget {cfg.budget} -> {metrics['budget_pairs']} pairs"),
            ("final", final),
            ("time", ", ".join(f"{k} {v:.0f}s" for k, v in metrics["seconds_by_phase"].items())),
            ("resumed rounds", metrics["rounds_resumed"]),
            ("model", metrics["checkpoint"]),
            (
                "pseudo-labels",
                f"{metrics['pseudo_labels']} ({metrics['pseudo_identities']} "
                f"provisional identities; answers in {metrics['constraints']})",
            ),
            (
                "next",
                f"reid-ray gallery build --manifest {metrics['pseudo_labels']} --model "
                f"{metrics['checkpoint']} --out GALLERY",
            ),
            ("output", f"{cfg.out}/metrics.json, {cfg.out}/al.png"),
        ],
    )
