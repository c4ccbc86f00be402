"""The ``reid-ray`` command: one sub-command per stage, plus ``synth``, ``demo``,
``manifest`` and ``split``.

Each stage keeps its command function in ``reid_ray/<stage>/commands.py`` (imported here,
light at import time); the work happens in the library. What a user meets is kept here in
one place: the help pages (:data:`GUIDE`: one-line summaries, an example per command, the
value names) and the failures: a ``ReidRayError``, a usage error or a storage failure the
user can fix (:func:`reid_ray.errors.user_message`) becomes one line on stderr and exit
status 2; ``--verbose`` keeps the traceback of the latter.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import typer

from reid_ray.helptext import VALUE_NAMES, HelpGuide

app = typer.Typer(
    name="reid-ray",
    help="Distributed animal re-identification on Ray: have we seen this individual before?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (command name, module, function): stage commands live beside their stage.
STAGE_COMMANDS = [
    ("embed", "reid_ray.embed.commands", "embed_command"),
    ("index", "reid_ray.index.commands", "index_command"),
    ("search", "reid_ray.index.commands", "search_command"),
    ("evaluate", "reid_ray.evaluation.commands", "evaluate_command"),
    ("train", "reid_ray.train.commands", "train_command"),
    ("rerank", "reid_ray.rerank.commands", "rerank_command"),
    ("benchmark", "reid_ray.benchmark.commands", "benchmark_command"),
    ("sweep", "reid_ray.benchmark.commands", "sweep_command"),
    ("al", "reid_ray.active.commands", "al_command"),
    ("identify", "reid_ray.gallery.commands", "identify_command"),
    ("review", "reid_ray.review.commands", "review_command"),
]


def quiet_ray(command: Callable) -> Callable:
    """Run ``command`` with Ray's own INFO logging in ``<out>/logs/ray.log`` (its path
    printed once Ray has started) instead of on the terminal; ``--verbose`` leaves it on
    the terminal. ``--out`` is checked writable first."""

    @functools.wraps(command)  # typer reads the options from the wrapped signature
    def run(*args, **kwargs):
        from reid_ray import io as rio
        from reid_ray.console import ray_log_path, route_ray_logs

        if kwargs.get("out"):  # a bucket that is missing or refuses us fails now, not at the end
            rio.check_writable(kwargs["out"])
        route_ray_logs(ray_log_path(kwargs.get("out") or kwargs.get("gallery")))
        try:
            return command(*args, **kwargs)
        finally:  # an s3:// output keeps Ray's log beside its results
            from reid_ray.runtime import copy_ray_log

            copy_ray_log(kwargs.get("out") or kwargs.get("gallery"))

    return run


@app.callback()
def _main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Debug logging; Ray's own logs on the terminal too."
    ),
) -> None:
    from reid_ray.console import setup_logging

    setup_logging(verbose)


@app.command("synth")
def synth_command(
    out: str = typer.Option(
        ..., help="Output folder for the toy zoo (metadata.csv, split.csv, images/)."
    ),
    species: int = typer.Option(3, min=1, help="Number of species (body shapes)."),
    individuals: int = typer.Option(30, min=2, help="Total number of individuals."),
    images_per: int = typer.Option(8, min=1, help="Images per individual."),
    size: int = typer.Option(256, min=32, max=4096, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same zoo."),
    split_kind: str = typer.Option("disjoint", help="Split file kind: closed, open or disjoint."),
) -> None:
    """Generate the synthetic toy zoo: identity is carried only by each animal's coat pattern."""
    from reid_ray import console
    from reid_ray.synth import generate_zoo

    if split_kind not in ("closed", "open", "disjoint"):
        raise typer.BadParameter("use closed, open or disjoint", param_hint="--split-kind")
    with console.progress() as update:
        summary = generate_zoo(
            out,
            species=species,
            individuals=individuals,
            images_per=images_per,
            size=size,
            seed=seed,
            split_kind=split_kind,
            progress=console.stage_progress(update, "toy zoo"),
        )
    console.summary(
        "toy zoo",
        [
            ("images", f"{summary.n_images} of {summary.n_individuals} individuals "
             f"({summary.n_species} species)"),
            ("time", f"{summary.seconds:.1f} s "
             f"({summary.n_images / max(summary.seconds, 1e-9):.0f} images/s)"),
            ("manifest", summary.metadata_path),
            ("split", summary.split_path),
        ],
    )  # fmt: skip


@app.command("demo")
@quiet_ray
def demo_command(
    out: str = typer.Option(
        "demo-out", help="Output folder: report.md, metrics.json and every stage's outputs."
    ),
    preset: str = typer.Option("default", help="Size preset: tiny (a smoke run), default, large."),
    seed: int = typer.Option(0, help="Seed of the toy zoo."),
    skip_train: bool = typer.Option(False, help="Skip the training stage."),
    skip_rerank: bool = typer.Option(False, help="Skip the re-ranking stage."),
) -> None:
    """Run every stage on a fresh toy zoo on a local Ray cluster and write a report."""
    from reid_ray.demo import run_demo

    run_demo(out, preset=preset, seed=seed, train=not skip_train, rerank=not skip_rerank)


@app.command("manifest")
def manifest_command(
    images: str = typer.Option(..., help="Folder of images, any depth (local or s3://)."),
    out: str = typer.Option(
        ..., help="Manifest CSV to write; files that are not images go to <name>.errors.csv."
    ),
    by_identity: bool = typer.Option(
        False, help="Each sub-folder of --images is one individual, named by the folder."
    ),
    threads: int = typer.Option(16, min=1, help="Files read at once (object stores: GETs)."),
) -> None:
    """Write a manifest for a folder of your own images (no identities), or for a folder
    per individual with --by-identity. Files are recognised as images by their content, not
    their extension; the others are listed with their reason, not dropped."""
    from reid_ray import console
    from reid_ray.data.folders import (
        check_manifest_out,
        errors_path_for,
        scan_folder,
        write_folder_manifest,
    )

    check_manifest_out(out)  # before reading thousands of files
    with console.progress() as update:
        scan = scan_folder(
            images,
            by_identity=by_identity,
            exclude=(out, errors_path_for(out)),
            threads=threads,
            progress=console.stage_progress(update, "files"),
        )
    errors_file = write_folder_manifest(scan, out)
    rows = [
        ("images", f"{len(scan.frame)} of {scan.n_files} files "
         f"({', '.join(f'{n} {k}' for k, n in sorted(scan.formats.items())) or 'none'})"),
    ]  # fmt: skip
    if by_identity:
        identities = scan.frame["identity"]
        loose = int((identities == "").sum())
        note = f" ({loose} images directly under --images: identity unknown)" if loose else ""
        rows.append(("identities", f"{identities[identities != ''].nunique()}{note}"))
    reasons = scan.errors["reason"].value_counts()
    rows.append(("not images", f"{len(scan.errors)}" + "".join(
        f"; {n} {reason}" for reason, n in reasons.head(3).items())))  # fmt: skip
    rows += [("manifest", out), ("errors", errors_file)]
    console.summary("manifest", rows)


@app.command("split")
def split_command(
    manifest: str = typer.Option(..., help="Manifest with identities (CSV or Parquet)."),
    out: str = typer.Option(..., help="Split CSV to write (image_id,split; local or s3://)."),
    kind: str = typer.Option(
        "disjoint",
        help="disjoint: train/val individuals apart from the test ones; open: every "
        "individual in query and gallery but some only as unknown queries; closed: none unknown.",
    ),
    seed: int = typer.Option(0, help="The same seed and manifest give the same split anywhere."),
    train_fraction: float = typer.Option(
        0.5, min=0, max=1, help="disjoint: share of individuals to train."
    ),
    val_fraction: float = typer.Option(
        0.1, min=0, max=1, help="disjoint: share of individuals to validate."
    ),
    unknown_fraction: float = typer.Option(
        0.2, min=0, max=1, help="Share of test individuals seen only as queries (answer: new)."
    ),
    queries_per_identity: int = typer.Option(
        2, min=1, help="Query images per known test individual."
    ),
) -> None:
    """Write a split file (image_id,split) for a labelled manifest, per individual: train,
    val, query, gallery and query_unknown (individuals absent from the gallery)."""
    from reid_ray import console
    from reid_ray.data import make_split, read_manifest, write_split
    from reid_ray.errors import ConfigError

    frame = read_manifest(manifest).to_pandas()
    if frame["identity"].isna().all():
        raise ConfigError(
            f"{manifest} has no identities: a split needs labelled images "
            "(reid-ray manifest --by-identity for a folder per individual)"
        )
    split = make_split(frame, kind=kind, seed=seed, train_fraction=train_fraction,
                       val_fraction=val_fraction, unknown_fraction=unknown_fraction,
                       queries_per_identity=queries_per_identity)  # fmt: skip
    write_split(split, out)
    identity = dict(zip(frame["image_id"], frame["identity"], strict=True))
    split["identity"] = split["image_id"].map(identity)
    counts = split.groupby("split")["identity"].agg(["size", "nunique"])
    rows = [(name, f"{int(counts.loc[name, 'size'])} images of {int(counts.loc[name, 'nunique'])} "
             "individuals") for name in ("train", "val", "query", "gallery", "query_unknown")
            if name in counts.index]  # fmt: skip
    rows.append(("unused", f"{len(frame) - len(split)} images (no identity)"))
    rows.append(("split", out))
    console.summary(f"split ({kind}, seed {seed})", rows)


def _register_stage_commands() -> None:
    for name, module_name, attr in STAGE_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # stage not built yet
            raise
        app.command(name)(quiet_ray(getattr(module, attr)))


_register_stage_commands()
# a command group cannot go through STAGE_COMMANDS: `gallery build|merge|history|rollback`
app.add_typer(importlib.import_module("reid_ray.gallery.commands").gallery_app, name="gallery")


#: what the help pages add to the commands' own text: the one place to edit it
GUIDE = HelpGuide(
    groups=(
        ("Start here", ("demo", "synth")),
        ("Your own images", ("manifest", "split", "evaluate")),
        ("The nightly job", ("gallery", "identify", "review")),
        ("Stages one by one", ("embed", "index", "search", "rerank", "train")),
        ("Active learning and benchmarks", ("al", "sweep", "benchmark")),
    ),
    summaries={
        "demo": "Every stage on a fresh toy zoo, with a report.",
        "synth": "Generate the synthetic toy zoo (images + manifest + split).",
        "manifest": "A manifest for a folder of images (or one per individual).",
        "split": "A split file (train/val/query/gallery) for a manifest.",
        "evaluate": "Top-k, mAP and known-vs-new accuracy of a model on a split.",
        "gallery": "The versioned gallery: build, merge, history, rollback.",
        "identify": "The nightly job: known individual or new, per image.",
        "review": "A page to review a night's decisions; writes the reviewed CSV.",
        "embed": "Embed every image of a manifest (resumable).",
        "index": "A FAISS index of gallery embeddings.",
        "search": "Top-K gallery candidates of every query.",
        "rerank": "Re-rank candidates with local features, calibrated.",
        "train": "Fine-tune a re-ID model with Ray Train (ArcFace).",
        "al": "Active learning: ask about ambiguous pairs, fine-tune.",
        "sweep": "Ray Tune sweep of active-learning settings.",
        "benchmark": "Every configured method on every dataset: one table.",
        "gallery build": "Embed labelled images into version v0001.",
        "gallery merge": "A night's accepted results into a new version.",
        "gallery history": "Every version and what produced it.",
        "gallery rollback": "Make another complete version current.",
    },
    examples={
        "": ("reid-ray demo --out demo-out --preset tiny",),
        "demo": ("reid-ray demo --out demo-out --preset tiny",),
        "synth": ("reid-ray synth --out zoo --individuals 30 --images-per 8",),
        "manifest": (
            "reid-ray manifest --images night/ --out night/manifest.csv",
            "reid-ray manifest --images s3://bucket/dogs/ --by-identity --out dogs.csv",
        ),
        "split": ("reid-ray split --manifest dogs.csv --out dogs-split.csv --seed 0",),
        "review": ("reid-ray review --results nights/2026-12-08",),
        "evaluate": (
            "reid-ray evaluate --manifest dogs.csv --split dogs-split.csv \\\n"
            "    --model timm:efficientnet_lite0 --out runs/eval",
        ),
        "embed": (
            "reid-ray embed --manifest zoo/metadata.csv --model timm:efficientnet_lite0 \\\n"
            "    --out runs/embed",
        ),
        "index": (
            "reid-ray index --embeddings runs/embed --manifest zoo/metadata.csv \\\n"
            "    --split zoo/split.csv --out runs/index",
        ),
        "search": (
            "reid-ray search --index runs/index --embeddings runs/embed \\\n"
            "    --manifest zoo/metadata.csv --split zoo/split.csv --out runs/search",
        ),
        "rerank": (
            "reid-ray rerank --candidates runs/search/candidates \\\n"
            "    --manifest zoo/metadata.csv --extractor sift --matcher classical \\\n"
            "    --out runs/rerank",
        ),
        "train": (
            "reid-ray train --manifest dogs.csv --split dogs-split.csv \\\n"
            "    --model timm:efficientnet_lite0 --epochs 4 --out runs/train",
        ),
        "gallery": ("reid-ray gallery build --manifest dogs.csv --model runs/train --out gallery",),
        "gallery build": (
            "reid-ray gallery build --manifest dogs.csv --model runs/train --out gallery",
        ),
        "identify": (
            "reid-ray identify --gallery gallery --manifest night/manifest.csv \\\n"
            "    --out night/run",
        ),
        "gallery merge": (
            "reid-ray gallery merge --gallery gallery --results night/run \\\n"
            "    --reviewed night/run/review.csv",
        ),
        "gallery history": ("reid-ray gallery history --gallery gallery",),
        "gallery rollback": ("reid-ray gallery rollback --gallery gallery --version v0002",),
        "al": (
            "reid-ray al --manifest zoo/metadata.csv --split zoo/split.csv \\\n"
            "    --model timm:efficientnet_lite0 --sampler aas --budget 0.1% \\\n"
            "    --out runs/al",
        ),
        "sweep": ("reid-ray sweep --config jobs/configs/sweep_toyzoos.yaml --out runs/sweep",),
        "benchmark": (
            "reid-ray benchmark --config jobs/configs/benchmark_dogfacenet.yaml \\\n"
            "    --set data_root=/data",
        ),
    },
    metavars={**VALUE_NAMES, "manifest --out": "FILE", "split --out": "FILE"},
    notes={
        **dict.fromkeys(
            (("train", "--manifest"), ("train", "--model"), ("train", "--out")),
            "required, or in --config",
        ),
        **dict.fromkeys(
            (("al", "--manifest"), ("al", "--out")), "required, or in --config; not with --annotate"
        ),
    },
)


def click_command():
    """The click command tree of :data:`app`, every page rendered by :data:`GUIDE`."""
    import typer.main

    from reid_ray.helptext import use_help_guide

    return use_help_guide(typer.main.get_command(app), GUIDE)


def main(args: list[str] | None = None) -> None:
    """The ``reid-ray`` entry point: every failure the user can fix is one line, exit 2."""
    from reid_ray.console import run_click

    run_click(click_command(), args, prog_name="reid-ray")


if __name__ == "__main__":
    main()
