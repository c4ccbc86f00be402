"""``reid-ray rerank``: the typer command function (registered by ``reid_ray/cli.py``).

Only typer and the standard library are imported at module level so that ``--help`` stays
fast; the work is in ``reid_ray.rerank.pipeline``.
"""

from __future__ import annotations

import time
from typing import Any

import typer

from reid_ray.errors import ReidRayError


def _progress_printer(console):
    """A rich progress display and the ``progress(stage, n, total)`` callback feeding it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    tasks: dict[str, Any] = {}

    def progress(stage: str, n: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], advance=n)

    return bar, progress


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
        help="Labelled gallery-vs-gallery candidates Parquet to fit the calibrated fusion on.",
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
    cache_dir: str | None = typer.Option(
        None, "--cache-dir", help="Feature cache [OUT/scores/features]."
    ),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    threshold: float | None = typer.Option(
        None, "--threshold", help="Known-vs-new threshold on the calibrated probability [0.5]."
    ),
    viz: int = typer.Option(0, "--viz", help="Draw the top matches of the first N queries."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard stored scores in OUT."),
) -> None:
    """Re-rank retrieval candidates with local features (LightGlue or classical matching)
    and a calibrated fusion of global and local scores."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
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
            console=console,
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
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _print_summary(console, summary)


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
    console=None,
) -> dict[str, Any]:
    """The command's work, callable from Python; returns the summary written to manifest.json."""
    import pyarrow as pa

    from reid_ray import io as rio
    from reid_ray.data import read_manifest
    from reid_ray.errors import ConfigError
    from reid_ray.rerank.config import load_rerank_config
    from reid_ray.rerank.fusion import FusionModel
    from reid_ray.rerank.pipeline import (
        _rank_order,
        read_table,
        rerank,
        rerank_with_calibration,
        score_pairs_detailed,
        top_predictions,
    )
    from reid_ray.runtime import init_ray

    t0 = time.perf_counter()
    cfg = load_rerank_config(config, **(overrides or {}))
    if calibration and fusion_path:
        raise ConfigError("give --calibration (fit a fusion) or --fusion (reuse one), not both")
    man = read_manifest(manifest, split_file=split)
    cands = read_table(candidates)
    scores_dir = rio.join(out, "scores")
    cfg = cfg if cfg.cache_dir else cfg.replace(cache_dir=rio.join(scores_dir, "features"))
    init_ray()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    bar, progress = _progress_printer(console) if console is not None else (None, None)
    fusion_model = None
    info: dict[str, Any] = {}
    if bar is not None:
        bar.start()
    try:
        if calibration:
            reranked, fusion_model, info = rerank_with_calibration(
                cands,
                read_table(calibration),
                man,
                cfg,
                out,
                progress=progress,
                overwrite=overwrite,
            )
            errors, stats = info.pop("errors"), info["scoring"]
        else:
            df = cands.to_pandas()
            df["query_id"] = df["query_id"].astype(str)
            df["gallery_id"] = df["gallery_id"].astype(str)
            top = df[_rank_order(df) < cfg.top_k]
            result = score_pairs_detailed(
                pa.Table.from_pandas(top[["query_id", "gallery_id"]], preserve_index=False),
                man,
                cfg,
                scores_dir,
                progress=progress,
                overwrite=overwrite,
            )
            errors, stats = result.errors, result.stats
            scored = result.table.to_pandas().drop_duplicates(["query_id", "gallery_id"])
            df = df.merge(scored, on=["query_id", "gallery_id"], how="left")
            if fusion_path:
                fusion_model = FusionModel.load(fusion_path)
                if cfg.threshold is not None:
                    fusion_model = FusionModel(
                        fusion_model.global_cal,
                        fusion_model.local_cal,
                        fusion_model.final_cal,
                        fusion_model.weight,
                        cfg.threshold,
                        fusion_model.stats,
                    )
                reranked = rerank(
                    pa.Table.from_pandas(df, preserve_index=False), man, cfg, out, fusion_model
                )
            else:
                reranked = pa.Table.from_pandas(df, preserve_index=False)
    finally:
        if bar is not None:
            bar.stop()

    outputs = {
        "reranked": rio.join(out, "reranked", "part-00000.parquet"),
        "errors": rio.join(out, "errors", "part-00000.parquet"),
    }
    rio.write_table_atomic(outputs["reranked"], reranked)
    rio.write_table_atomic(outputs["errors"], errors)
    n_new = None
    if fusion_model is not None:
        preds = top_predictions(reranked, man, fusion_model)
        outputs["predictions"] = rio.join(out, "predictions", "part-00000.parquet")
        rio.write_table_atomic(outputs["predictions"], preds)
        n_new = int(sum(preds["is_new"].to_pylist()))
        outputs["fusion"] = rio.join(out, "fusion.json")
        if not calibration:
            fusion_model.save(outputs["fusion"])
    pictures: list[str] = []
    if viz > 0:
        from reid_ray.rerank.viz import render_queries

        pictures = render_queries(
            reranked, man, cfg, rio.join(out, "viz"), cfg.cache_dir, max_queries=viz
        )
        outputs["viz"] = rio.join(out, "viz")
    summary = {
        "command": "rerank",
        "inputs": {
            "candidates": candidates,
            "manifest": manifest,
            "split": split,
            "calibration": calibration,
            "fusion": fusion_path,
        },
        "config": cfg.to_dict(),
        "reranked": fusion_model is not None,
        "counts": {
            "queries": stats.get("queries"),
            "pairs": stats.get("unique_pairs"),
            "pairs_matched_now": stats.get("pairs_matched"),
            "queries_resumed": stats.get("queries_resumed"),
            "pairs_without_local_score": stats.get("pairs_without_score"),
            "images_extracted": stats.get("images_extracted"),
            "errors": int(errors.num_rows),
            "predicted_new": n_new,
            "pictures": len(pictures),
        },
        "throughput": {
            "pairs_per_s": stats.get("pairs_per_s"),
            "pairs_per_actor_s": stats.get("pairs_per_actor_s"),
            "what": "pairs matched / wall seconds of the matching stage (actor start-up included); "
            "per actor-second: inside the actors' match calls",
        },
        "timings": {
            "extract_s": stats.get("extract_seconds"),
            "match_s": stats.get("match_seconds"),
            "total_s": round(time.perf_counter() - t0, 3),
        },
        "pool": {
            "actors": stats.get("actors"),
            "cpus_per_actor": stats.get("cpus_per_actor"),
            "gpus_per_actor": stats.get("gpus_per_actor"),
        },
        "feature_fingerprint": stats.get("fingerprint"),
        "fusion": None
        if fusion_model is None
        else {
            "weight": fusion_model.weight,
            "threshold": fusion_model.threshold,
            "calibration_pairs": info.get("calibration_pairs"),
        },
        "outputs": outputs,
    }
    rio.write_json_atomic(rio.join(out, "manifest.json"), summary)
    return summary


def _print_summary(console, summary: dict[str, Any]) -> None:
    from rich.table import Table

    c, tp, tm = summary["counts"], summary["throughput"], summary["timings"]
    t = Table(title="reid-ray rerank", show_header=False, box=None)
    cfg = summary["config"]
    t.add_row("features / matcher", f"{cfg['extractor']} / {cfg['matcher']}  (top-{cfg['top_k']})")
    t.add_row("queries", f"{c['queries']}  ({c['queries_resumed']} resumed)")
    t.add_row("pairs", f"{c['pairs']}  ({c['pairs_matched_now']} matched now)")
    t.add_row("pairs/s", f"{tp['pairs_per_s']}  (per actor-second: {tp['pairs_per_actor_s']})")
    t.add_row(
        "errors", f"{c['errors']}  ({c['pairs_without_local_score']} pairs without a local score)"
    )
    if summary["fusion"]:
        f = summary["fusion"]
        t.add_row(
            "fusion",
            f"local weight {f['weight']:.2f}, threshold {f['threshold']:.2f}; "
            f"{c['predicted_new']} queries predicted new",
        )
    else:
        t.add_row("fusion", "none: scores only (pass --calibration or --fusion to re-rank)")
    t.add_row(
        "time", f"{tm['total_s']:.1f} s (features {tm['extract_s']} s, matching {tm['match_s']} s)"
    )
    t.add_row("outputs", str(summary["outputs"].get("reranked")))
    console.print(t)
