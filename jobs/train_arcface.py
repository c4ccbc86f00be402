"""Ray job: ArcFace training on a manifest's train rows (``reid-ray train`` as a job).

    ray job submit --working-dir . -- python jobs/train_arcface.py \
        --config jobs/configs/train_arcface.yaml [--out s3://bucket/run --workers 4 ...]

Thin: the YAML names the manifest, split, output and training settings; options on the
command line override it. The work is ``reid_ray.train.commands.train_command``, the same
function as ``reid-ray train``. Joins the cluster named by RAY_ADDRESS (``ray job submit``
sets it), else starts a local one.
"""

from __future__ import annotations

import sys

import typer

from reid_ray.console import setup_logging
from reid_ray.errors import ReidRayError
from reid_ray.train.commands import train_command


def main() -> None:
    setup_logging()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(train_command)
    try:
        app()
    except ReidRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
