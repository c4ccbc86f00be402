"""``reid-ray embed``: the command function (registered by ``reid_ray.cli``).

Light at import time: the library is imported when the command runs.
"""

from __future__ import annotations

import typer


def embed_summary_rows(summary) -> list[tuple[str, str]]:
    """The one-screen summary of an embed run, as (key, value) rows for ``console.summary``."""
    plan = summary.plan or {}
    rows = [
        ("model", f"{summary.model_ref} - {summary.description}"),
        ("fingerprint", summary.key),
        ("rows", f"{summary.n_manifest_rows} ({summary.n_already_embedded} already embedded)"),
        ("embedded", str(summary.n_embedded)),
        ("errors", f"{summary.n_errors} images, {summary.n_manifest_errors} manifest rows"),
        (
            "throughput",
            f"{summary.images_per_second:.1f} images/s over "
            f"{summary.pipeline_seconds:.1f} s (whole pipeline)",
        ),
        ("resources", ", ".join(f"{k}={v}" for k, v in plan.items()) or "-"),
        ("output", summary.out),
    ]
    for example in summary.error_examples[:3]:
        rows.append(("  e.g.", f"{example['image_id']}: {example['reason']}"))
    return rows


def embed_command(
    manifest: str = typer.Option(..., help="Manifest (CSV or Parquet; local path or s3://)."),
    model: str = typer.Option(
        ..., help="Model: timm:NAME, hf-hub:ORG/NAME, or a reid-ray checkpoint path."
    ),
    out: str = typer.Option(..., help="Output folder (local or s3://): embeddings/, errors/."),
    image_size: int | None = typer.Option(None, help="Input side in pixels (default: model's)."),
    flip: bool = typer.Option(False, help="Flip test-time augmentation (image + mirror)."),
    batch_size: int = typer.Option(0, help="Images per inference batch (0: automatic)."),
    actors: int = typer.Option(0, help="Inference actors (0: one per GPU, or per 8 CPUs)."),
    cpus_per_actor: float = typer.Option(0.0, help="CPUs per inference actor (0: automatic)."),
    threads: int = typer.Option(0, help="Torch threads per actor (0: its CPU share)."),
    decode_cpus: float = typer.Option(0.0, help="CPUs per decoder (0: automatic)."),
    decode_mode: str = typer.Option(
        "actors", help="Decode on long-lived actors (default) or in Ray tasks ('tasks')."
    ),
    rows_per_part: int = typer.Option(2048, help="Rows per Parquet part (the resume unit)."),
    read_threads: int = typer.Option(8, help="Concurrent image reads per decode batch."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (fp16 on GPU), fp32 or fp16."),
    overwrite: bool = typer.Option(
        False, help="Replace embeddings of another model found in --out."
    ),
    config: str | None = typer.Option(
        None, help="Embed settings file (YAML/JSON); options given here override it."
    ),
) -> None:
    """Embed every image of a manifest: read, decode and resize in CPU tasks, infer in an
    actor pool, write L2-normalised vectors to Parquet. A rerun resumes."""
    from reid_ray import console
    from reid_ray.embed.config import load_embed_config
    from reid_ray.embed.pipeline import embed

    given = dict(
        image_size=image_size,
        flip=flip or None,
        batch_size=batch_size or None,
        actors=actors or None,
        cpus_per_actor=cpus_per_actor or None,
        threads=threads or None,
        decode_cpus=decode_cpus or None,
        decode_mode=None if decode_mode == "actors" else decode_mode,
        read_threads=None if read_threads == 8 else read_threads,
        rows_per_part=None if rows_per_part == 2048 else rows_per_part,
        device=None if device == "auto" else device,
        precision=None if precision == "auto" else precision,
    )
    cfg = load_embed_config(config, given)  # options left at their default keep the file's
    with console.progress() as update:
        summary = embed(
            manifest,
            model,
            out,
            cfg,
            overwrite=overwrite,
            progress=console.stage_progress(update, "embedding"),
            command="reid-ray embed",
        )
    console.summary("embed", embed_summary_rows(summary))
