"""The ``reid-ray`` command: one sub-command per stage, plus ``synth`` and ``demo``.

Each stage keeps its command function in ``reid_ray/<stage>/commands.py`` (imported here,
light at import time); the work happens in the library. A ``ReidRayError`` becomes one
clear message and exit status 2.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable

import typer

from reid_ray.errors import ReidRayError

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
]


def quiet_ray(command: Callable) -> Callable:
    """Run ``command`` with Ray's own INFO logging in ``<out>/logs/ray.log`` (its path
    printed once) instead of on the terminal; ``--verbose`` leaves it on the terminal."""

    @functools.wraps(command)  # typer reads the options from the wrapped signature
    def run(*args, **kwargs):
        from reid_ray.console import ray_log_path, route_ray_logs

        route_ray_logs(ray_log_path(kwargs.get("out") or kwargs.get("gallery")))
        return command(*args, **kwargs)

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


def main() -> None:
    try:
        app()
    except ReidRayError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
