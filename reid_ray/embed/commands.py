"""``reid-ray embed``: the command function (registered by ``reid_ray.cli``).

Light at import time: the library is imported when the command runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import typer


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar; yields ``update(done, total)``. Ray Data's own bars and its
    per-run INFO lines are turned off so the terminal shows one bar (warnings still show)."""
    import logging

    import ray.data  # noqa: F401 - its logging is configured on import; adjust after
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def embed_summary_table(summary, title: str = "embed"):
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
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
    for key, value in rows:
        table.add_row(key, value)
    return table


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
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (fp16 on GPU), fp32 or fp16."),
    overwrite: bool = typer.Option(
        False, help="Replace embeddings of another model found in --out."
    ),
) -> None:
    """Embed every image of a manifest: read, decode and resize in CPU tasks, infer in an
    actor pool, write L2-normalised vectors to Parquet. A rerun resumes."""
    from rich.console import Console

    from reid_ray.embed.config import EmbedConfig
    from reid_ray.embed.pipeline import embed

    cfg = EmbedConfig(
        image_size=image_size,
        flip=flip,
        batch_size=batch_size,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        threads=threads,
        decode_cpus=decode_cpus,
        decode_mode=decode_mode,
        rows_per_part=rows_per_part,
        device=device,
        precision=precision,
    )
    with progress_bar("embedding") as update:
        summary = embed(
            manifest,
            model,
            out,
            cfg,
            overwrite=overwrite,
            progress=update,
            command="reid-ray embed",
        )
    Console().print(embed_summary_table(summary))
