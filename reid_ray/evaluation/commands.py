"""``reid-ray evaluate``: the command function (registered by ``reid_ray.cli``)."""

from __future__ import annotations

import typer

METRIC_ROWS = ("top1", "top5", "top20", "mAP", "baks", "baus", "threshold")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def evaluate_command(
    manifest: str = typer.Option(..., help="Manifest (CSV or Parquet; local path or s3://)."),
    split: str | None = typer.Option(
        None, help="Split file (image_id,split); default: the manifest's split column."
    ),
    model: str = typer.Option(
        ..., help="Model: timm:NAME, hf-hub:ORG/NAME, or a reid-ray checkpoint path."
    ),
    out: str = typer.Option(..., help="Output folder: metrics.json, candidates/, embed/."),
    rerank: bool = typer.Option(False, help="Re-rank the candidates with local features."),
    rerank_config: str | None = typer.Option(
        None, help="Re-ranking settings (YAML/JSON file); implies --rerank."
    ),
    k: int = typer.Option(100, min=1, help="Candidates per query."),
    image_size: int | None = typer.Option(None, help="Input side in pixels (default: model's)."),
    flip: bool = typer.Option(False, help="Flip test-time augmentation."),
    batch_size: int = typer.Option(0, help="Images per inference batch (0: automatic)."),
    actors: int = typer.Option(0, help="Inference actors (0: automatic)."),
    overwrite: bool = typer.Option(
        False, help="Replace cached embeddings of another model in --out."
    ),
) -> None:
    """The benchmark protocol on the query, gallery and query_unknown rows of a split:
    embed, index the gallery, search, write metrics.json (top-k, mAP, BAKS/BAUS)."""
    from reid_ray import console
    from reid_ray.embed.config import load_embed_config
    from reid_ray.evaluation.protocol import evaluate

    cfg = load_embed_config(None, dict(flip=flip, batch_size=batch_size, actors=actors))
    rerank_arg = None
    if rerank_config:
        from reid_ray.rerank.config import load_rerank_config

        rerank_arg = load_rerank_config(rerank_config)
    elif rerank:
        rerank_arg = True
    with console.progress() as update:
        metrics = evaluate(
            manifest,
            split,
            model,
            out,
            rerank=rerank_arg,
            image_size=image_size,
            embed_cfg=cfg,
            k=k,
            overwrite=overwrite,
            progress=console.stage_progress(update, "embedding"),
            command="reid-ray evaluate",
        )
    counts = metrics["counts"]
    rows = [
        ("model", f"{model} - {metrics['model']['description']}"),
        (
            "rows",
            f"{counts['gallery_rows']} gallery ({counts['gallery_identities']} individuals), "
            f"{counts['query_rows']} query, {counts['query_unknown_rows']} query_unknown; "
            f"{counts['embed_errors']} embed errors",
        ),
    ]
    rows += [(key, _fmt(metrics[key])) for key in METRIC_ROWS if key in metrics]
    if "global" in metrics:
        g = metrics["global"]
        rows.append(("global only", f"top1 {_fmt(g.get('top1'))}, mAP {_fmt(g.get('mAP'))}"))
    timings = metrics["timings"]
    rows.append(
        (
            "time",
            f"{timings['total_seconds']:.1f} s (embedding {timings['embed_seconds']:.1f} s, "
            f"{timings['embed_images_per_second']:.1f} images/s)",
        )
    )
    rows.append(("output", f"{out}/metrics.json"))
    console.summary("evaluate", rows)
