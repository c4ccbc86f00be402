"""The terminal is for people: one home for progress bars, summaries and log routing.

The library logs with ``logging.getLogger(__name__)`` and reports progress through plain
callbacks ``progress(stage, done, total)``; only the CLI, jobs and the demo turn those into
what a person sees, with the helpers here:

* :func:`setup_logging` - reid-ray's INFO and everyone's warnings on the terminal.
* :func:`route_ray_logs` - Ray's and Ray Data's own INFO logging into a log file (its
  path printed once), warnings still on the terminal; ``--verbose`` shows everything.
* :func:`progress` - a rich progress display; yields ``update(stage, done, total)``, one
  bar per stage.
* :func:`summary` - a one-screen key/value table.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

ProgressFn = Callable[[str, int, int], None]

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.serve")

_state: dict[str, Any] = {"verbose": False, "log_file": None, "console": None}


def console():
    """The shared rich console (stdout)."""
    from rich.console import Console

    if _state["console"] is None:
        _state["console"] = Console()
    return _state["console"]


def setup_logging(verbose: bool = False) -> None:
    """reid-ray's INFO (DEBUG with ``verbose``) and other libraries' warnings, via rich."""
    from rich.logging import RichHandler

    _state["verbose"] = bool(verbose)
    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False, console=console())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("reid_ray").setLevel(level)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not verbose:
        # Ray workers' stdout/stderr and Ray Data's own progress bars stay off the terminal
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def route_ray_logs(log_file: str | None) -> str | None:
    """Send Ray's own loggers to ``log_file`` (INFO and up); keep only their warnings on
    the terminal. With ``verbose`` logging nothing is rerouted. Returns the file used."""
    if _state["verbose"] or not log_file:
        return None
    from reid_ray import io as rio

    if rio.is_remote(log_file):
        return None
    if _state["log_file"] == os.path.abspath(log_file):
        return _state["log_file"]
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    file_handler = logging.FileHandler(log_file)
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.FileHandler) and getattr(h, "_reid_ray", False):
                lg.removeHandler(h)
                h.close()
        # Ray installs its own stream handlers on import: keep only their warnings
        for h in lg.handlers:
            if not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
    file_handler._reid_ray = True  # type: ignore[attr-defined]
    top = logging.getLogger("ray")
    top.addHandler(file_handler)
    top.setLevel(logging.INFO)
    for name in RAY_LOGGERS[1:]:
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO)
        if not lg.propagate:
            lg.addHandler(file_handler)
    _state["log_file"] = os.path.abspath(log_file)
    console().print(f"[dim]Ray logs: {_state['log_file']}[/dim]", highlight=False)
    return _state["log_file"]


@contextlib.contextmanager
def progress(transient: bool = False) -> Iterator[ProgressFn]:
    """A rich progress display; yields ``update(stage, done, total)`` (one bar a stage,
    ``total`` 0 or less means unknown)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bars: dict[str, Any] = {}
    with Progress(
        TextColumn("[bold]{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(),
        transient=transient,
    ) as display:

        def update(stage: str, done: int, total: int) -> None:
            task = bars.get(stage)
            if task is None:
                task = bars[stage] = display.add_task(stage, total=total if total > 0 else None)
            display.update(task, completed=done, total=total if total > 0 else None)

        yield update


def stage_progress(update: ProgressFn | None, stage: str) -> Callable[[int, int], None] | None:
    """``update`` bound to one stage name: the ``progress(done, total)`` some stages take."""
    if update is None:
        return None
    return lambda done, total: update(stage, done, total)


def summary(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    """Print a one-screen key/value summary."""
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, pad_edge=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(str(key), "-" if value is None else str(value))
    console().print(table)


def metrics_table(title: str, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """Print a small table of figures (floats with 3 decimals)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    console().print(table)


__all__ = [
    "ProgressFn",
    "console",
    "metrics_table",
    "progress",
    "route_ray_logs",
    "setup_logging",
    "stage_progress",
    "summary",
]
