"""``reid-ray index`` and ``reid-ray search``: command functions (registered by the CLI)."""

from __future__ import annotations

import typer

from reid_ray.errors import ConfigError


def _splits(text: str) -> tuple[str, ...]:
    from reid_ray.data.splits import SPLIT_NAMES

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SPLIT_NAMES]
    if not names or bad:
        raise ConfigError(f"--splits: use a comma-separated list of {', '.join(SPLIT_NAMES)}")
    return names


def _gpu(value: str) -> bool | str:
    if value not in ("auto", "yes", "no"):
        raise ConfigError(f"--gpu must be auto, yes or no, got {value!r}")
    return {"auto": "auto", "yes": True, "no": False}[value]


def index_command(
    embeddings: str = typer.Option(..., help="An embed output folder (reid-ray embed --out)."),
    out: str = typer.Option(..., help="Index folder to write (local or s3://)."),
    manifest: str | None = typer.Option(
        None, help="Index only this manifest's rows (of --splits when it has splits)."
    ),
    split: str | None = typer.Option(None, help="Split file (image_id,split) for --manifest."),
    splits: str = typer.Option("gallery", help="Splits to index, comma-separated."),
    exact_threshold: int = typer.Option(
        100_000, help="Exact search up to this many items, IVF above."
    ),
    nlist: int = typer.Option(0, help="IVF lists (0: about 4 sqrt(N))."),
    nprobe: int = typer.Option(0, help="IVF lists visited per query (0: nlist / 8)."),
    gpu: str = typer.Option("auto", help="GPU index: auto, yes or no."),
    on_ray: bool = typer.Option(
        False, "--on-ray/--here", help="Build on a Ray worker (the vectors never reach here)."
    ),
) -> None:
    """Build a FAISS index (inner product on L2-normalised embeddings) of a gallery."""
    from reid_ray import console
    from reid_ray.index.jobs import index_embeddings

    if split and not manifest:
        raise ConfigError("--split needs --manifest")
    summary = index_embeddings(
        embeddings,
        out,
        manifest=manifest,
        split=split,
        splits=_splits(splits),
        exact_threshold=exact_threshold,
        nlist=nlist,
        nprobe=nprobe,
        use_gpu=_gpu(gpu),
        on_ray=on_ray,
        command="reid-ray index",
    )
    console.summary(
        "index",
        [
            ("index", f"{summary.kind} of {summary.n} x {summary.dim} (model {summary.key})"),
            ("missing", f"{summary.n_missing} selected rows had no embedding"),
            ("time", f"{summary.seconds:.1f} s"),
            ("output", summary.out),
        ],
    )


def search_command(
    index: str = typer.Option(..., help="Index folder (reid-ray index --out)."),
    embeddings: str = typer.Option(..., help="Embed output folder holding the queries."),
    out: str = typer.Option(..., help="Output folder: candidates/part-*.parquet."),
    manifest: str | None = typer.Option(
        None, help="Search only this manifest's rows (of --splits when it has splits)."
    ),
    split: str | None = typer.Option(None, help="Split file (image_id,split) for --manifest."),
    splits: str = typer.Option("query,query_unknown", help="Splits to search, comma-separated."),
    k: int = typer.Option(100, min=1, help="Candidates per query."),
    exclude_self: bool = typer.Option(
        False, help="Skip the gallery item with the query's own id (gallery vs itself)."
    ),
    nprobe: int = typer.Option(0, help="IVF lists visited per query (0: the index's)."),
    actors: int = typer.Option(
        0, min=0, help="Searcher actors on the Ray cluster, one index copy each (0: here)."
    ),
) -> None:
    """Top-K gallery candidates of every query: query_id, rank, gallery_id, score."""
    from reid_ray import console
    from reid_ray.index.jobs import search_embeddings

    if split and not manifest:
        raise ConfigError("--split needs --manifest")
    summary = search_embeddings(
        index,
        embeddings,
        out,
        manifest=manifest,
        split=split,
        splits=_splits(splits),
        k=k,
        exclude_self=exclude_self,
        nprobe=nprobe,
        actors=actors,
        command="reid-ray search",
    )
    console.summary(
        "search",
        [
            ("queries", f"{summary.n_queries}, top {summary.k}: {summary.n_candidates} candidates"),
            ("missing", f"{summary.n_missing} selected rows had no embedding"),
            ("time", f"{summary.seconds:.1f} s ({summary.queries_per_second:.0f} queries/s)"),
            ("output", summary.out),
        ],
    )
