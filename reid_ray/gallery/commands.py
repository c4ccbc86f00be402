"""CLI: ``reid-ray gallery build|merge|history|rollback`` and ``reid-ray identify``."""

from __future__ import annotations

import typer

gallery_app = typer.Typer(
    name="gallery",
    help="A versioned gallery of known individuals: build, merge nightly results, roll back.",
    no_args_is_help=True,
    add_completion=False,
)

CONFIG_HELP = "Nightly settings file (YAML/JSON, e.g. jobs/configs/nightly_reid.yaml)."
SET_HELP = "Override one setting, KEY=VALUE (e.g. search.k=100); repeatable."


def _config(config: str | None, given: dict, sets: list[str] | None):
    from reid_ray.config import merge, parse_overrides
    from reid_ray.gallery.config import load_nightly_config

    overrides = merge(
        parse_overrides({k: v for k, v in given.items() if v is not None}),
        parse_overrides(sets or []),
    )
    return load_nightly_config(config, overrides)


@gallery_app.command("build")
def build_command(
    manifest: str = typer.Option(..., help="Labelled images (CSV or Parquet, local or s3://)."),
    model: str = typer.Option(..., help="Model: timm:NAME, hf-hub:ORG/NAME or a checkpoint."),
    out: str = typer.Option(..., help="The gallery folder to create (local or s3://)."),
    image_size: int | None = typer.Option(None, help="Input side in pixels (default: model's)."),
    config: str | None = typer.Option(None, help=CONFIG_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Embed labelled images once and write version v0001: index, identities, calibration."""
    from reid_ray import console
    from reid_ray.gallery.build import build_gallery

    cfg = _config(config, {"embed.image_size": image_size}, set_)
    with console.progress() as update:
        report = build_gallery(manifest, model, out, cfg, progress=update)
    c = report["counts"]
    console.summary(
        f"gallery {out} {report['version']}",
        [
            ("images", c["images"]),
            ("identities", c["identities"]),
            ("errors", c["errors"]),
            ("known-vs-new threshold", f"{report['threshold']:.4f}"),
            ("seconds", f"{report['timings']['total']:.1f}"),
        ],
    )


@gallery_app.command("merge")
def merge_command(
    gallery: str = typer.Option(..., help="The gallery folder."),
    results: list[str] = typer.Option(..., help="An identify output folder; repeatable."),
    reviewed: str | None = typer.Option(None, help="Reviewers' CSV (review.csv, edited)."),
    config: str | None = typer.Option(None, help=CONFIG_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Accepted results (or a reviewed CSV) into the gallery as a new version; atomic, and
    merging the same night twice adds nothing the second time."""
    from reid_ray import console
    from reid_ray.gallery.merge import merge_results

    report = merge_results(gallery, results, _config(config, {}, set_), reviewed=reviewed)
    console.summary(
        f"gallery {gallery}",
        [
            ("version", report["version"] + ("" if report["new_version"] else " (unchanged)")),
            ("added", report["added"]),
            ("already in gallery", report["skipped_in_gallery"]),
            ("rejected rows", len(report["errors"])),
        ]
        + (
            [("not reviewed (not merged)", report["review"]["unreviewed"])]
            if report.get("review")
            else []
        ),
    )


@gallery_app.command("history")
def history_command(gallery: str = typer.Option(..., help="The gallery folder.")) -> None:
    """Every version with what produced it; the current one marked."""
    from reid_ray import console
    from reid_ray.gallery.store import history

    console.metrics_table(
        f"gallery {gallery}",
        ["version", "current", "operation", "images", "added", "created"],
        [
            (
                h["version"],
                "*" if h["current"] else "",
                h["operation"],
                h["counts"].get("images"),
                h["counts"].get("added"),
                h["created"],
            )
            for h in history(gallery)
        ],
    )


@gallery_app.command("rollback")
def rollback_command(
    gallery: str = typer.Option(..., help="The gallery folder."),
    version: str = typer.Option(..., help="The version to make current, e.g. v0002."),
) -> None:
    """Make an earlier (or later) complete version current again."""
    from reid_ray import console
    from reid_ray.gallery.store import set_current

    v = set_current(gallery, version)
    console.summary(
        f"gallery {gallery}", [("current", v.name), ("images", v.info["counts"]["images"])]
    )


def identify_command(
    gallery: str = typer.Option(..., help="The gallery folder (its current version is used)."),
    manifest: str = typer.Option(..., help="The night's images (CSV or Parquet)."),
    out: str = typer.Option(..., help="Output folder: results/, review.csv, report.json."),
    model: str | None = typer.Option(None, help="Refused unless it is the gallery's model."),
    night: str | None = typer.Option(None, help="Tag of provisional ids (default: out's name)."),
    config: str | None = typer.Option(None, help=CONFIG_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """The nightly job: known individual or new, for every new image of the manifest."""
    from reid_ray import console
    from reid_ray.gallery.identification import identify

    cfg = _config(config, {"night": night}, set_)
    with console.progress() as update:
        report = identify(gallery, manifest, out, cfg, model_ref=model, progress=update)
    c = report["counts"]
    rows = [
        ("gallery version", report["gallery_version"]),
        ("identified", c["identified"]),
        ("known", c["known"]),
        ("new", f"{c['new']} ({c['new_individuals']} individuals)"),
        ("already in gallery", c["already_in_gallery"]),
        ("errors", c["errors"]),
        ("seconds", f"{report['timings']['total']:.1f}"),
    ]
    rr = report.get("rerank") or {}
    if rr.get("threshold") is not None:
        rows.append(
            (
                "re-ranked",
                f"{rr['extractor']} + {rr['matcher']}: known when the {rr['decision_score']} >= "
                f"{rr['threshold']:.3f} ({rr['threshold_source']}); {rr['errors']} errors",
            )
        )
    ev = report.get("evaluation") or {}
    if ev.get("n_labelled"):
        rows.append(("decision accuracy (labelled rows)", f"{ev['decision_accuracy']:.3f}"))
    from reid_ray.review.sheet import next_steps

    rows += next_steps(out, gallery)
    console.summary(f"identify -> {out}", rows)
