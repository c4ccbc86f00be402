"""``reid-ray review``: the local review page for one night's identify output (registered by
``reid_ray.cli``), or, with ``--check``, the reviewed CSV's validation alone. Light at
import time."""

from __future__ import annotations

import typer


def _report(title: str, state) -> None:
    from reid_ray.console import summary

    p = state.progress()
    summary(
        title,
        [
            ("reviewed", f"{p['reviewed']} of {p['total']} ({p['skipped']} skipped)"),
            ("failed images", len(state.failed)),
            ("reviewed CSV", state.reviewed_path),
            ("validation", p["check"]["summary"]),
            ("merge", state.snapshot()["merge_command"]),
        ],
    )
    for error in p["check"]["errors"]:
        typer.echo(f"  invalid row {error['image_id']}: {error['reason']}", err=True)


def review_command(
    results: str = typer.Option(
        ..., help="The night's identify output folder (--out of identify)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind (the page has no login)."),
    port: int = typer.Option(8766, help="Port of the page."),
    reviewed: str = typer.Option(
        None, help="Where the reviewed CSV goes (default: RESULTS/reviewed.csv)."
    ),
    check: bool = typer.Option(
        False, "--check", help="Only validate the reviewed CSV as `gallery merge` will; no page."
    ),
) -> None:
    """Review a night in the browser: the query beside its top candidates, one key per
    decision; decisions are saved as they are made and a later sitting resumes them."""
    from reid_ray import io as rio
    from reid_ray.console import console
    from reid_ray.errors import ConfigError

    if check:
        from reid_ray.review.state import ReviewState

        state = ReviewState(results, reviewed_path=reviewed, read_only=True)
        if not rio.exists(state.reviewed_path):
            raise ConfigError(
                f"no reviewed CSV at {state.reviewed_path}: review the night first "
                f"(`reid-ray review --results {results}`), or name one with --reviewed"
            )
        _report(f"review of {results}", state)
        if not state.check.ok:
            raise ConfigError(
                f"{state.reviewed_path}: {len(state.check.errors)} invalid row(s); "
                "`gallery merge` would refuse them"
            )
        return

    from reid_ray.review.server import serve

    def ready(state) -> None:
        p = state.progress()
        console().print(
            f"review page for {results} on http://{host}:{port}/ (Ctrl-C stops): "
            f"{p['reviewed']} of {p['total']} reviewed so far"
        )

    state = serve(results, host=host, port=port, ready=ready, reviewed_path=reviewed)
    _report(f"review of {results}", state)
