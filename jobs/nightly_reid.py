"""Ray job: the nightly re-identification run (identify, then optionally merge).

    ray job submit --working-dir . -- python jobs/nightly_reid.py \
        --config jobs/configs/nightly_reid.yaml [--gallery G --manifest M --out DIR \
        --merge --set search.k=100 ...]

Thin: the YAML names the gallery, the night's manifest and the output; options override
it. On a GPU cluster use ``jobs/configs/gpu_nightly_identify.yaml`` (``embed.device: cuda``
asks Ray for GPUs, so an autoscaler adds GPU nodes). The work is ``reid_ray.gallery.identify`` (and ``merge_results`` with ``--merge``),
the same functions as ``reid-ray identify`` and ``reid-ray gallery merge``. Joins the
cluster named by RAY_ADDRESS (``ray job submit`` sets it), else starts a local one.
Exit status 2 on a ReidRayError, with one message.
"""

from __future__ import annotations

import json
import logging

import typer

from reid_ray.console import run_as_job

logger = logging.getLogger("nightly_reid")


def nightly(
    config: str = typer.Option(..., help="Nightly settings (jobs/configs/nightly_reid.yaml)."),
    gallery: str | None = typer.Option(None, help="Gallery folder (overrides the config)."),
    manifest: str | None = typer.Option(None, help="The night's manifest."),
    out: str | None = typer.Option(None, help="Output folder of the night."),
    night: str | None = typer.Option(None, help="Tag of provisional ids."),
    merge: bool | None = typer.Option(None, "--merge/--no-merge", help="Merge afterwards."),
    reviewed: str | None = typer.Option(None, help="A reviewed CSV to merge instead."),
    set_: list[str] | None = typer.Option(None, "--set", help="KEY=VALUE override; repeatable."),
) -> None:
    from reid_ray.config import merge as merge_dicts
    from reid_ray.config import parse_overrides
    from reid_ray.errors import ConfigError
    from reid_ray.gallery import identify, load_nightly_config, merge_results

    given = dict(
        gallery=gallery, manifest=manifest, out=out, night=night, merge=merge, reviewed=reviewed
    )
    cfg = load_nightly_config(
        config, merge_dicts(parse_overrides(given), parse_overrides(set_ or []))
    )
    for name in ("gallery", "manifest", "out"):
        if not getattr(cfg, name):
            raise ConfigError(f"{name} is not set: give --{name} or set it in {config}")
    report = identify(cfg.gallery, cfg.manifest, cfg.out, cfg, model_ref=cfg.model)
    summary = {
        "identify": {
            "counts": report["counts"],
            "timings": report["timings"],
            "evaluation": report.get("evaluation"),
        }
    }
    if cfg.merge:
        merged = merge_results(cfg.gallery, cfg.out, cfg, reviewed=cfg.reviewed)
        summary["merge"] = {
            k: merged[k] for k in ("version", "added", "skipped_in_gallery", "new_version")
        }
    logger.info("nightly run done: %s", json.dumps(summary, default=str))
    typer.echo(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    run_as_job(nightly)
