"""``reid-ray rerank``: the typer command function (registered by ``reid_ray/cli.py``).

Only typer and the standard library are imported at module level so that ``--help`` stays
fast; the work is ``reid_ray.rerank.rerank_candidates``.
"""

from __future__ import annotations

import time
from typing import Any

import typer

from reid_ray.errors import ReidRayError


def rerank_command(
    candidates: str = typer.Option(
        ...,
        "--candidates",
        help="Candidates Parquet (query_id, rank, gallery_id, score): file or folder.",
    ),
    manifest: str = typer.Option(..., "--manifest", help="Manifest CSV/Parquet (local or s3://)."),
    out: str = typer.Option(..., "--out", help="Output folder (local or s3://); reruns resume."),
    split: str | None = typer.Option(
        None, "--split", help="Split file (image_id,split) for the manifest."
    ),
    calibration: str | None = typer.Option(
        None,
        "--calibration",
        help="Labelled gallery leave-one-out candidates Parquet to fit the calibrated fusion on.",
    ),
    fusion: str | None = typer.Option(
        None, "--fusion", help="A fusion.json from an earlier run to reuse."
    ),
    config: str | None = typer.Option(None, "--config", help="YAML/JSON file of rerank settings."),
    extractor: str | None = typer.Option(None, "--extractor", help="disk | aliked | sift"),
    matcher: str | None = typer.Option(None, "--matcher", help="lightglue | classical"),
    top_k: int | None = typer.Option(None, "--top-k", help="Candidates re-ranked per query [100]."),
    max_keypoints: int | None = typer.Option(
        None, "--max-keypoints", help="Keypoints per image [512]."
    ),
    resize: int | None = typer.Option(
        None, "--resize", help="Long side in px before extraction [512]."
    ),
    actors: int | None = typer.Option(None, "--actors", help="Matcher actors (0: automatic)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Pairs per matcher call [16]."
    ),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Feature cache [OUT/features]."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Known-vs-new threshold on the calibrated probability (default: fitted on the "
        "calibration candidates, on the global or the fused score, whichever decides better).",
    ),
    viz: int = typer.Option(0, "--viz", help="Draw the top matches of the first N queries."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard stored scores in OUT."),
) -> None:
    """Re-rank retrieval candidates with local features (LightGlue or classical matching)
    and a calibrated fusion of global and local scores."""
    from reid_ray import console

    try:
        with console.progress() as update:
            summary = run_rerank(
                candidates=candidates,
                manifest=manifest,
                out=out,
                split=split,
                calibration=calibration,
                fusion_path=fusion,
                config=config,
                viz=viz,
                overwrite=overwrite,
                progress=update,
                overrides={
                    "extractor": extractor,
                    "matcher": matcher,
                    "top_k": top_k,
                    "max_keypoints": max_keypoints,
                    "resize_long_side": resize,
                    "actors": actors,
                    "batch_size": batch_size,
                    "cache_dir": cache_dir,
                    "device": device,
                    "threshold": threshold,
                },
            )
    except ReidRayError as exc:
        console.console().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.summary("reid-ray rerank", summary_rows(summary))


def read_candidates_arg(path: str):
    """A candidates table from a Parquet file or a search/evaluate output (parts folder)."""
    from reid_ray.index.candidates import read_candidates
    from reid_ray.parts import read_part

    if path.endswith(".parquet"):
        return read_part(path)
    return read_candidates(path)


def run_rerank(
    *,
    candidates: str,
    manifest: str,
    out: str,
    split: str | None = None,
    calibration: str | None = None,
    fusion_path: str | None = None,
    config: str | None = None,
    viz: int = 0,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
    progress=None,
) -> dict[str, Any]:
    """The command's work, callable from Python; returns the run record (manifest.json)."""
    from reid_ray import io as rio
    from reid_ray.data import read_manifest
    from reid_ray.errors import ConfigError
    from reid_ray.parts import write_part, write_run_record
    from reid_ray.rerank import FusionModel, load_rerank_config, rerank_candidates
    from reid_ray.rerank.ranking import top_predictions

    t0 = time.perf_counter()
    cfg = load_rerank_config(config, **(overrides or {}))
    if calibration and fusion_path:
        raise ConfigError("give --calibration (fit a fusion) or --fusion (reuse one), not both")
    if not calibration and not fusion_path:
        raise ConfigError(
            "give --calibration (labelled gallery candidates to fit the fusion on) or --fusion "
            "(a fusion.json to reuse): re-ranking never ranks by uncalibrated scores"
        )
    man = read_manifest(manifest, split_file=split)
    result = rerank_candidates(
        read_candidates_arg(candidates),
        man,
        cfg,
        out,
        calibration_candidates=read_candidates_arg(calibration) if calibration else None,
        fusion=FusionModel.load(fusion_path) if fusion_path else None,
        progress=progress,
        overwrite=overwrite,
    )
    decision = _decision(result, man, cfg, fusion_path)
    preds = top_predictions(result.ranked, man, decision)
    outputs = {
        "reranked": write_part(rio.join(out, "reranked"), result.ranked, name="part-00000.parquet"),
        "errors": write_part(rio.join(out, "errors"), result.errors, name="part-00000.parquet"),
        "predictions": write_part(rio.join(out, "predictions"), preds, name="part-00000.parquet"),
        "fusion": rio.join(out, "fusion.json"),
    }
    if result.calibration is not None:
        outputs["calibration"] = write_part(
            rio.join(out, "calibration"), result.calibration, name="part-00000.parquet"
        )
    pictures: list[str] = []
    if viz > 0:
        from reid_ray.rerank.viz import render_queries

        cache = cfg.cache_dir or rio.join(out, "features")
        pictures = render_queries(
            result.ranked, man, cfg, rio.join(out, "viz"), cache, max_queries=viz
        )
        outputs["viz"] = rio.join(out, "viz")
    st = result.stats["scoring"]
    return write_run_record(
        out,
        "rerank",
        config=cfg,
        counts={
            "queries": result.stats["queries"],
            "pairs": st.get("unique_pairs"),
            "pairs_matched_now": st.get("pairs_matched"),
            "queries_resumed": st.get("queries_resumed"),
            "pairs_without_local_score": st.get("pairs_without_score"),
            "images_extracted": st.get("images_extracted"),
            "errors": int(result.errors.num_rows),
            "predicted_new": int(sum(bool(x) for x in preds["is_new"].to_pylist())),
            "pictures": len(pictures),
        },
        timings={
            "extract_s": st.get("extract_seconds"),
            "match_s": st.get("match_seconds"),
            **{f"{k}_s": v for k, v in result.stats["seconds"].items()},
            "command_s": round(time.perf_counter() - t0, 3),
        },
        inputs={
            "candidates": candidates,
            "manifest": manifest,
            "split": split,
            "calibration": calibration,
            "fusion": fusion_path,
        },
        throughput={
            "pairs_per_s": st.get("pairs_per_s"),
            "pairs_per_actor_s": st.get("pairs_per_actor_s"),
            "what": "pairs matched / wall seconds of the matching stage (actor start-up included); "
            "per actor-second: inside the actors' match calls",
        },
        pool=st.get("pool"),
        feature_fingerprint=st.get("fingerprint"),
        fusion={
            "weight": result.fusion.weight,
            "weight_reason": result.stats["weight_reason"],
            "calibration": result.stats.get("calibration"),
        },
        decision=None if decision is None else decision.to_dict(),
        outputs=outputs,
    )


def _decision(result, manifest, cfg, fusion_path: str | None):
    """The known-vs-new decision (``reid_ray.decide``): fitted on the calibration pairs
    when there are any, else the ``--threshold`` on the fused probability; None (nothing
    decided, said in the summary) when a reused fusion comes without a threshold."""
    from reid_ray.decide import DecisionConfig, fit_reranked_decision

    calib = result.calibration
    if calib is None or calib.num_rows == 0:
        if cfg.threshold is None:
            return None
        from reid_ray.decide import Decision

        return Decision(
            threshold=float(cfg.threshold), rule="given", target=None,
            score="calibrated P(same) of the top-1", auroc=float("nan"), separable=False,
            reliable=False, simulated={}, fitted_on=f"given with --fusion {fusion_path}",
            n_known=0, n_unknown=0, n_known_identities=0, n_unknown_identities=0,
            message="threshold given on the command line", gate="fused",
        )  # fmt: skip
    df = calib.to_pandas()
    gallery_ids = sorted(set(df["query_id"]) | set(df["gallery_id"]))
    return fit_reranked_decision(
        df, gallery_ids, manifest.identity_of(), cfg=DecisionConfig(seed=cfg.seed),
        fixed_threshold=cfg.threshold,
    )  # fmt: skip


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    c, tp, tm, cfg = summary["counts"], summary["throughput"], summary["timings"], summary["config"]
    f = summary["fusion"]
    return [
        ("features / matcher", f"{cfg['extractor']} / {cfg['matcher']}  (top-{cfg['top_k']})"),
        ("queries", f"{c['queries']}  ({c['queries_resumed']} resumed)"),
        ("pairs", f"{c['pairs']}  ({c['pairs_matched_now']} matched now)"),
        ("pairs/s", f"{tp['pairs_per_s']}  (per actor-second: {tp['pairs_per_actor_s']})"),
        (
            "errors",
            f"{c['errors']}  ({c['pairs_without_local_score']} pairs without a local score)",
        ),
        ("fusion", f"local weight {f['weight']:.2f}: {f['weight_reason']}"),
        ("known vs new", _decision_line(summary.get("decision"), c["predicted_new"])),
        (
            "time",
            f"{tm['total_s']:.1f} s (features {tm['extract_s']} s, matching {tm['match_s']} s)",
        ),
        ("outputs", summary["outputs"]["reranked"]),
    ]


def _decision_line(decision: dict[str, Any] | None, predicted_new: int) -> str:
    if decision is None:
        return "not decided: a reused fusion needs --threshold (or give --calibration)"
    return (
        f"threshold {decision['threshold']:.3g} on the {decision['gate']} score; "
        f"{predicted_new} queries predicted new"
    )
