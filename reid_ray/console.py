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

_state: dict[str, Any] = {"verbose": False, "log_file": None, "console": None, "file_handler": None}


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


#: Ray warnings that describe a default or a setting of ours, not a problem: file only
ROUTINE_NOTICES = (
    "ray._private.authentication.authentication_token_setup",  # token auth on (the default)
    "ray.data._internal.progress",  # "progress bars disabled" (ours replace them)
)

#: (logger prefix, message fragment): Ray warnings routine only by their text. Ray Data's
#: high-memory detector compares each worker's whole footprint (torch and the model loaded)
#: with the 0 bytes it requests and repeats that every 30 s through a training run; the
#: "hanging operator" detector of the same logger stays on the terminal. A sweep resumed
#: after a hard kill finds no Tune result files for the trials that finished (Tune had not
#: synced them): the sweep reads each AL run's own metrics.json, so that is routine too.
ROUTINE_MESSAGES = (
    ("ray.data._internal.issue_detection.issue_detector_manager", "of memory per worker"),
    ("ray.data._internal.issue_detection.issue_detector_manager", "To disable issue detection"),
    ("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics"),
)


def _routine(record: logging.LogRecord) -> bool:
    """Whether ``record`` is a routine Ray notice (log file only), by logger or by text."""
    if record.name.startswith(ROUTINE_NOTICES):
        return True
    text = None
    for prefix, fragment in ROUTINE_MESSAGES:
        if record.name.startswith(prefix):
            text = record.getMessage() if text is None else text
            if fragment in text:
                return True
    return False


class _ToFileOnly(logging.Filter):
    """Keep a record off the terminal; hand it to the log file's handler instead."""

    def __init__(self, file_handler: logging.Handler | None = None) -> None:
        super().__init__()
        self.file_handler = file_handler

    def filter(self, record: logging.LogRecord) -> bool:
        if not _routine(record):
            return True
        if self.file_handler is not None and record.levelno >= self.file_handler.level:
            self.file_handler.handle(record)
        return False


def route_ray_logs(log_file: str | None) -> str | None:
    """Send Ray's own loggers to ``log_file`` (INFO and up); keep only their warnings on
    the terminal (less :data:`ROUTINE_NOTICES` and :data:`ROUTINE_MESSAGES`). With
    ``verbose`` nothing is rerouted.

    ``ray.init`` drops the handlers of the ``ray`` logger: :func:`reid_ray.runtime.init_ray`
    calls this again afterwards (``log_file`` None re-applies the current file). The path
    is printed once. Returns the file used.
    """
    if _state["verbose"]:
        return None
    from reid_ray import io as rio

    log_file = log_file or _state["log_file"]
    if not log_file or rio.is_remote(log_file):
        return None
    path = os.path.abspath(log_file)
    # Ray and Ray Data install their terminal handlers on import: import them first, so
    # the handlers exist when they are turned down to warnings below
    import ray  # noqa: F401
    import ray.data  # noqa: F401

    file_handler = _state.get("file_handler")
    if file_handler is None or _state["log_file"] != path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        file_handler = logging.FileHandler(path)
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
        )
        file_handler._reid_ray = True  # type: ignore[attr-defined]
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if getattr(h, "_reid_ray", False) and h is not file_handler:
                lg.removeHandler(h)
                h.close()
        for h in lg.handlers:
            if not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
                h.filters = [f for f in h.filters if not isinstance(f, _ToFileOnly)]
                h.addFilter(_ToFileOnly(file_handler))
        lg.setLevel(logging.INFO)
        if (name == "ray" or not lg.propagate) and file_handler not in lg.handlers:
            lg.addHandler(file_handler)
        if name == "ray" and not any(
            not isinstance(h, logging.FileHandler) for h in lg.handlers
        ):  # ray.init(configure_logging=False) removed its terminal handler: warnings need one
            terminal = logging.StreamHandler()
            terminal.setLevel(logging.WARNING)
            terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            terminal.addFilter(_ToFileOnly(file_handler))
            lg.addHandler(terminal)
    # records Ray logs while its handlers are cleared (inside ray.init) fall to Python's
    # last-resort handler: filter the routine ones at their own loggers
    for name in (*ROUTINE_NOTICES, *{prefix for prefix, _ in ROUTINE_MESSAGES}):
        lg = logging.getLogger(name)
        lg.filters = [f for f in lg.filters if not isinstance(f, _ToFileOnly)]
        lg.addFilter(_ToFileOnly(file_handler))
    first = _state["log_file"] != path
    _state["log_file"], _state["file_handler"] = path, file_handler
    if first:
        console().print(f"[dim]Ray logs: {path}[/dim]", highlight=False)
    return path


def ray_log_in_use() -> str | None:
    """The log file Ray's logs go to now (None: not routed yet, or ``verbose``)."""
    return _state["log_file"]


def ray_log_path(out: str | None) -> str:
    """Where a command writing to ``out`` keeps Ray's logs: ``<out>/logs/ray.log``, or a
    local file under the temp folder when ``out`` is an object store (or not given)."""
    import tempfile
    import time

    from reid_ray import io as rio

    if out and not rio.is_remote(out):
        return os.path.join(os.path.abspath(out), "logs", "ray.log")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return os.path.join(tempfile.gettempdir(), "reid-ray-logs", f"ray-{stamp}-{os.getpid()}.log")


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


def run_as_job(command: Callable[..., Any]) -> None:
    """``python jobs/NAME.py --config F ...``: ``command`` (a typer-annotated function) as a
    one-command app; a ``ReidRayError`` becomes one line on stderr and exit status 2."""
    import sys

    import typer

    from reid_ray.errors import ReidRayError

    setup_logging()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    try:
        app()
    except ReidRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


__all__ = [
    "ProgressFn",
    "console",
    "metrics_table",
    "progress",
    "ray_log_path",
    "route_ray_logs",
    "run_as_job",
    "setup_logging",
    "stage_progress",
    "summary",
]
