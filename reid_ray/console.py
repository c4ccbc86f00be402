"""The terminal is for people: one home for progress bars, summaries and log routing.

The library logs with ``logging.getLogger(__name__)`` and reports progress through plain
callbacks ``progress(stage, done, total)``; only the CLI, jobs and the demo turn those into
what a person sees, with the helpers here:

* :func:`setup_logging` - reid-ray's INFO and everyone's warnings on the terminal.
* :func:`route_ray_logs` - Ray's and Ray Data's own INFO logging into a log file (its
  path printed once Ray runs), warnings still on the terminal; ``--verbose`` shows
  everything.
* :func:`progress` - a rich progress display; yields ``update(stage, done, total)``, one
  bar per stage.
* :func:`summary`, :func:`metrics_table` - tables printed whole: cells wrap on a narrow
  terminal and keep their width in a file or a pipe (a log holds every cell).
* :func:`run_click`, :func:`report_failure` - how ``reid-ray`` and the jobs run: a failure
  the user can fix is one line on stderr and exit status 2 (help pages: ``helptext``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

ProgressFn = Callable[[str, int, int], None]

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.serve")

_state: dict[str, Any] = {
    "verbose": False,
    "log_file": None,
    "console": None,
    "file_handler": None,
    "announced": None,  # the log file whose path was printed
}


def console():
    """The shared rich console (stdout)."""
    from rich.console import Console

    if _state["console"] is None:
        _state["console"] = Console()
    return _state["console"]


def verbose() -> bool:
    """Whether ``--verbose`` was given (tracebacks and Ray's logs stay on the terminal)."""
    return bool(_state["verbose"])


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
    is printed once, on the first call after Ray has started. Returns the file used.
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
    import ray
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
    _state["log_file"], _state["file_handler"] = path, file_handler
    # named once Ray runs (init_ray calls this again after ray.init): a command that
    # fails before Ray starts has no Ray log to point at
    if ray.is_initialized() and _state.get("announced") != path:
        _state["announced"] = path
        console().print(f"[dim]Ray logs: {path}[/dim]", highlight=False, soft_wrap=True)
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


def print_table(table: Any) -> None:
    """Print a rich table whole. On a terminal narrower than the table, cells wrap (never
    ``rou…``); into a file or a pipe it keeps its natural width, so a log holds every cell
    (rich would cut it to 80 columns)."""
    out = console()
    for column in table.columns:
        column.overflow = "fold"
    if out.is_terminal:
        out.print(table)
        return
    from rich.console import Console

    natural = out.measure(table, options=out.options.update_width(10_000)).maximum
    if natural <= out.width:
        out.print(table)
        return
    # rich caps print(width=...) at the console's width: a console as wide as the table
    Console(file=out.file, width=natural, color_system=None, highlight=False).print(table)


def summary(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    """Print a one-screen key/value summary."""
    from rich.table import Table

    table = Table(
        title=title,
        show_header=False,
        box=None,
        pad_edge=False,
        title_justify="left",
        min_width=len(title),
    )
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(str(key), "-" if value is None else str(value))
    print_table(table)


def metrics_table(title: str, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """Print a small table of figures (floats with 3 decimals)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", min_width=len(title) + 4)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    print_table(table)


def error_line(message: str) -> None:
    """One line on stderr, never wrapped (a log keeps it whole; a terminal folds it)."""
    import sys

    text = " ".join(str(message).split())
    prefix = "\033[1;31merror:\033[0m" if sys.stderr.isatty() else "error:"
    print(f"{prefix} {text}", file=sys.stderr, flush=True)


def report_failure(exc: BaseException) -> bool:
    """Print ``exc`` as one line on stderr when it is a failure the user can fix (a
    ``ReidRayError``, a missing file or bucket, S3 credentials: see
    :func:`reid_ray.errors.user_message`) and return True; False for anything else (a bug,
    or any failure with ``--verbose``: the caller re-raises, so its traceback shows)."""
    from reid_ray.errors import ReidRayError, user_message

    message = user_message(exc)
    if message is None or (verbose() and not isinstance(exc, ReidRayError)):
        return False
    error_line(message)
    return True


def run_click(command: Any, args: Sequence[str] | None = None, *, prog_name: str) -> None:
    """Run a click command as a program: a usage error or a failure the user can fix is
    one line on stderr and exit status 2 (see :func:`report_failure`); anything else keeps
    its traceback. Never returns."""
    import sys

    from typer._click import exceptions as click_exceptions
    from typer.exceptions import Abort

    try:
        code = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help())
        sys.exit(0)
    except click_exceptions.UsageError as exc:
        ctx = getattr(exc, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error_line(f"{exc.format_message()}{where}")
        sys.exit(2)
    except Abort:
        error_line("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if not report_failure(exc):
            raise
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def run_as_job(command: Callable[..., Any]) -> None:
    """``python jobs/NAME.py --config F ...``: ``command`` (a typer-annotated function) as a
    one-command program, with the CLI's help pages and one-line failures (exit 2)."""
    import sys

    import typer
    import typer.main

    from reid_ray.helptext import HelpGuide, use_help_guide

    setup_logging()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    root = use_help_guide(typer.main.get_command(app), HelpGuide())
    run_click(root, prog_name=f"python {sys.argv[0]}")


__all__ = [
    "ProgressFn",
    "console",
    "error_line",
    "metrics_table",
    "print_table",
    "progress",
    "ray_log_path",
    "report_failure",
    "route_ray_logs",
    "run_as_job",
    "run_click",
    "setup_logging",
    "stage_progress",
    "summary",
]
