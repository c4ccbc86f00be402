"""``reid-ray al``: one active-learning run (registered by ``reid_ray.cli``), or, with
``--annotate DIR``, the local annotation page for a round's pairs. Light at import time."""

from __future__ import annotations

import typer


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
        None, help="Pairs to ask: a fraction of all train pairs (0.00033 or 0.033%) or a count."
    ),
    rounds: int = typer.Option(None, min=1, help="Rounds (the budget is split evenly over them)."),
    oracle: str = typer.Option(
        None, help="simulated (reads the hidden identities) or human (pairs file + answers file)."
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
    """Active learning: rounds of embed, cluster, ask about ambiguous pairs, refine, fine-tune, evaluate."""
    from reid_ray.console import console, summary

    if annotate:
        from reid_ray.active.annotate import serve

        console().print(f"annotation page for {annotate} on http://{host}:{port}/ (Ctrl-C stops)")
        serve(annotate, host=host, port=port)
        return

    from reid_ray.active.config import load_al_config
    from reid_ray.active.report import print_table
    from reid_ray.active.runner import run_al

    overrides = {
        "manifest": manifest or None, "split": split, "out": out or None, "model": model,
        "sampler": sampler, "budget": budget, "rounds": rounds, "oracle": oracle, "seed": seed,
        "image_size": image_size,
    }  # fmt: skip
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = load_al_config(config, overrides)
    if epochs is not None:
        cfg = load_al_config(cfg, {"train": {**cfg.train, "epochs": epochs}})
    if not cfg.manifest or not cfg.out:
        raise typer.BadParameter("--manifest and --out are needed (or a --config naming them)")
    metrics = run_al(cfg, overwrite=overwrite)
    print_table(metrics)
    summary(
        "al",
        [
            ("sampler", f"{cfg.sampler}, budget {cfg.budget} -> {metrics['budget_pairs']} pairs"),
            ("final", f"top1 {metrics['top1']:.3f}  mAP {metrics['mAP']:.3f}"),
            ("time", ", ".join(f"{k} {v:.0f}s" for k, v in metrics["seconds_by_phase"].items())),
            ("resumed rounds", metrics["rounds_resumed"]),
            ("output", f"{cfg.out}/metrics.json, {cfg.out}/al.png"),
        ],
    )
