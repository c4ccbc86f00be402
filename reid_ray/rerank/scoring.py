"""Pairs -> local scores on the Ray actor pools: features once per image, resumable parts.

``score_pairs`` runs two Ray Data stages:

1. **features**: the images that the pairs need and the feature cache lacks (one listing
   finds them) go through ``FeatureActor``s that decode, crop, resize and extract, one
   cache entry per image. An image that cannot be used is recorded with its reason.
2. **matching**: the pairs, grouped by query, go through ``MatchActor``s (one GPU each when
   the job asks for or the cluster has GPUs, the same code on the CPU). An actor loads a
   query's features once, matches it against its candidates in batches and writes the
   batch's scores as one part. A rerun reads the parts first and skips the queries whose
   pairs are all there, so an interrupted run resumes and no pair is scored twice.

Bad images never crash a batch: their pairs get a null ``local_score`` and the image gets
a row in the errors table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reid_ray import io as rio
from reid_ray.console import ProgressFn
from reid_ray.data.manifest import BBOX_TYPE
from reid_ray.errors import ConfigError, ManifestError, OutputError
from reid_ray.parts import list_parts, read_parts
from reid_ray.rerank.actors import (
    ERRORS_DIR,
    PAIRS_DIR,
    SCORES_SCHEMA,
    STAGE_FEATURES,
    STAGE_MANIFEST,
    FeatureActor,
    MatchActor,
    plan_stage_pool,
)
from reid_ray.rerank.config import RerankConfig

logger = logging.getLogger(__name__)

SETTINGS_FILE = "scoring.json"


@dataclass
class ScoreResult:
    """``table``: the pairs with ``local_score`` (null where an image failed) and
    ``n_matches``; ``errors``: image_id, path, stage, reason; ``stats``: counts, timings."""

    table: pa.Table
    errors: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)


def as_manifest(manifest: Any):
    """A ``Manifest`` from a Manifest, a path (read with ``read_manifest``) or a table."""
    from reid_ray.data import Manifest, read_manifest

    if isinstance(manifest, Manifest):
        return manifest
    if isinstance(manifest, str):
        return read_manifest(manifest)
    if isinstance(manifest, pa.Table):
        return Manifest(manifest)
    raise ManifestError(
        f"expected a manifest (path, Manifest or table), got {type(manifest).__name__}"
    )


def require_columns(table: pa.Table, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ConfigError(
            f"{what} lacks column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}"
        )


def _image_rows(manifest, ids: set[str]) -> pa.Table:
    t = manifest.table
    t = t.filter(pc.is_in(t["image_id"], value_set=pa.array(sorted(ids), pa.string())))
    cols = {"image_id": t["image_id"], "path": t["path"]}
    cols["bbox"] = t["bbox"] if "bbox" in t.column_names else pa.nulls(t.num_rows, BBOX_TYPE)
    cols["mask"] = t["mask"] if "mask" in t.column_names else pa.nulls(t.num_rows, pa.string())
    return pa.table(cols)


def _check_settings(out_dir: str, settings: dict[str, Any], overwrite: bool) -> None:
    path = rio.join(out_dir, SETTINGS_FILE)
    if overwrite:
        for sub in (PAIRS_DIR, ERRORS_DIR):
            rio.remove(rio.join(out_dir, sub), recursive=True)
        rio.remove(path)
    if rio.exists(path):
        found = rio.read_json(path)
        if found != settings:
            changed = sorted(
                k for k in set(found) | set(settings) if found.get(k) != settings.get(k)
            )
            raise OutputError(
                f"{out_dir} holds local scores made with other settings ({', '.join(changed)}); "
                "use another output folder or overwrite it"
            )
        return
    rio.write_json_atomic(path, settings)


def _chunks(table: pa.Table, rows_per_block: int, max_blocks: int = 256) -> list[pa.Table]:
    n = table.num_rows
    if n == 0:
        return []
    per = max(rows_per_block, -(-n // max_blocks))
    return [table.slice(i, per) for i in range(0, n, per)]


def _stored(out_dir: str, sub: str):
    """The scores (or the errors) stored by earlier batches, as pandas."""
    from reid_ray.data import ERRORS_SCHEMA

    pairs = list_parts(rio.join(out_dir, PAIRS_DIR))
    if sub == PAIRS_DIR:
        return read_parts(rio.join(out_dir, PAIRS_DIR), SCORES_SCHEMA, files=pairs).to_pandas()
    done = {p.rsplit("/", 1)[-1] for p in pairs}  # an errors part counts with its pairs part
    files = [p for p in list_parts(rio.join(out_dir, sub)) if p.rsplit("/", 1)[-1] in done]
    return read_parts(rio.join(out_dir, sub), ERRORS_SCHEMA, files=files).to_pylist()


class _Pool:
    """Ray and a pool plan per stage (:func:`~reid_ray.rerank.actors.plan_stage_pool`: SIFT
    and the classical matcher on CPU pools, learned extractors and LightGlue on the
    configured device), started only when there is work (a finished rerun needs none)."""

    def __init__(self, cfg: RerankConfig, stats: dict[str, Any], *folders: str) -> None:
        self.cfg, self.stats, self.folders, self.plan = cfg, stats, folders, None

    def kwargs(self, blocks: int, stage: str) -> dict[str, Any]:
        from reid_ray.runtime import cluster_view, init_ray, require_shared_output

        if self.plan is None:
            init_ray()
            for folder in self.folders:  # workers write there: every node must see it
                require_shared_output(folder, "the re-ranking output")
        self.plan = plan_stage_pool(self.cfg, stage, cluster_view(), max(1, blocks))
        self.stats.setdefault("pools", {})[stage] = self.plan.to_dict()
        self.stats["pool"] = self.plan.to_dict()
        return self.plan.map_batches_kwargs()

    def run(self, actor: type, blocks: list[pa.Table], batch_size: int, **ctor: Any):
        """``blocks`` through a pool of ``actor(**ctor)``; yields the output batches."""
        import ray

        kwargs = self.kwargs(len(blocks), actor.STAGE)
        ds = ray.data.from_arrow(blocks).map_batches(
            actor,
            fn_constructor_kwargs={**ctor, "threads": self.plan.threads},
            batch_size=batch_size,
            batch_format="pyarrow",
            **kwargs,
        )
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def score_pairs(
    pairs: pa.Table,
    manifest: Any,
    cfg: RerankConfig,
    out_dir: str,
    *,
    cache_root: str | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> ScoreResult:
    """Local scores for ``pairs`` (query_id, gallery_id) on the actor pools; resumable.

    ``out_dir`` holds ``scoring.json`` (the settings; a rerun with other settings raises
    ``OutputError`` unless ``overwrite``), ``pairs/`` and ``errors/`` parts. Features go to
    ``cache_root`` (default ``cfg.cache_dir``, else ``<out_dir>/features``).
    """
    import pandas as pd

    from reid_ray.data import errors_table
    from reid_ray.rerank.cache import FeatureCache
    from reid_ray.rerank.features import feature_fingerprint

    t_start = time.perf_counter()
    require_columns(pairs, ("query_id", "gallery_id"), "the pairs table")
    manifest = as_manifest(manifest)
    fingerprint = feature_fingerprint(cfg)
    cache_root = cache_root or cfg.cache_dir or rio.join(out_dir, "features")
    cache = FeatureCache(cache_root, fingerprint)
    rio.makedirs(out_dir)
    _check_settings(out_dir, {"fingerprint": fingerprint, **cfg.match_settings()}, overwrite)
    cache.write_config(cfg.feature_settings())

    pdf = pairs.select(["query_id", "gallery_id"]).to_pandas().astype(str)
    unique_pairs = pdf.drop_duplicates(ignore_index=True)
    all_ids = set(unique_pairs["query_id"]) | set(unique_pairs["gallery_id"])
    rows = _image_rows(manifest, all_ids)
    paths = dict(zip(rows["image_id"].to_pylist(), rows["path"].to_pylist(), strict=True))
    errors: list[dict] = []
    unavailable: dict[str, str] = {}
    for i in sorted(all_ids - set(paths)):
        unavailable[i] = "image_id not in the manifest"
        errors.append(
            {"image_id": i, "path": None, "stage": STAGE_MANIFEST, "reason": unavailable[i]}
        )

    # 1. features for the images that the cache lacks (failed ones are retried on reruns)
    missing = cache.missing(rows["image_id"].to_pylist())
    stats: dict[str, Any] = {
        "pairs": int(len(pdf)),
        "unique_pairs": int(len(unique_pairs)),
        "images": len(all_ids),
        "images_cached": len(paths) - len(missing),
        "images_to_extract": len(missing),
        "fingerprint": fingerprint,
        "cache": cache_root,
        "pool": None,
    }
    pool = _Pool(cfg, stats, out_dir, cache_root)
    t0 = time.perf_counter()
    extracted = 0
    if missing:
        for out in pool.run(
            FeatureActor,
            _chunks(_image_rows(manifest, set(missing)), 4),
            4,
            cfg=cfg.to_dict(),
            cache_root=cache_root,
            fingerprint=fingerprint,
        ):
            for r in out.to_pylist():
                extracted += 1
                if not r["ok"]:
                    unavailable[r["image_id"]] = r["reason"]
                    errors.append(
                        {
                            "image_id": r["image_id"],
                            "path": paths.get(r["image_id"]),
                            "stage": STAGE_FEATURES,
                            "reason": r["reason"],
                        }
                    )
            if progress:
                progress("features", extracted, len(missing))
    stats["images_extracted"] = extracted
    stats["extract_seconds"] = round(time.perf_counter() - t0, 3)

    # 2. which queries are finished (resume): every pair present, and no null score that an
    #    image now available could fill
    done = _stored(out_dir, PAIRS_DIR).drop_duplicates(["query_id", "gallery_id"], keep="last")
    merged = unique_pairs.merge(done, on=["query_id", "gallery_id"], how="left", indicator=True)
    absent = merged["_merge"] == "left_only"
    fillable = (
        (merged["_merge"] == "both")
        & merged["local_score"].isna()
        & ~merged["query_id"].isin(unavailable)
        & ~merged["gallery_id"].isin(unavailable)
    )
    redo = set(merged.loc[absent | fillable, "query_id"])
    todo = unique_pairs[
        unique_pairs["query_id"].isin(redo) & ~unique_pairs["query_id"].isin(unavailable)
    ]
    stats["queries"] = int(unique_pairs["query_id"].nunique())
    stats["queries_resumed"] = int(stats["queries"] - len(redo))
    stats["pairs_cached"] = int(len(unique_pairs) - len(todo))
    stats["pairs_to_match"] = int(len(todo))

    # 3. matching, grouped by query
    t0 = time.perf_counter()
    matched, busy = 0, 0.0
    if len(todo):
        grouped = todo.groupby("query_id", sort=False)["gallery_id"].apply(list).reset_index()
        grouped = pa.table(
            {
                "query_id": pa.array(grouped["query_id"], pa.string()),
                "gallery_ids": pa.array(grouped["gallery_id"], pa.list_(pa.string())),
            }
        )
        for out in pool.run(
            MatchActor,
            _chunks(grouped, cfg.queries_per_batch),
            cfg.queries_per_batch,
            cfg=cfg.to_dict(),
            cache_root=cache_root,
            fingerprint=fingerprint,
            out_dir=out_dir,
            unavailable=unavailable,
        ):
            matched += int(pc.sum(out["pairs"]).as_py() or 0)
            busy += float(pc.sum(out["seconds"]).as_py() or 0.0)
            if progress:
                progress("pairs", matched, len(todo))
    match_seconds = time.perf_counter() - t0
    stats["pairs_matched"] = matched
    stats["match_seconds"] = round(match_seconds, 3)
    stats["pairs_per_s"] = (
        round(matched / match_seconds, 3) if matched and match_seconds > 0 else None
    )
    # time inside the actors' match calls (no actor start-up): pairs per actor-second
    stats["match_actor_seconds"] = round(busy, 3)
    stats["pairs_per_actor_s"] = round(matched / busy, 3) if matched and busy > 0 else None

    # 4. assemble: the stored scores joined onto the input pairs (in input order)
    scores = _stored(out_dir, PAIRS_DIR).drop_duplicates(["query_id", "gallery_id"], keep="last")
    base = pairs.to_pandas()
    base = base.drop(columns=[c for c in ("local_score", "n_matches") if c in base.columns])
    key = base[["query_id", "gallery_id"]].astype(str)
    joined = key.merge(scores, on=["query_id", "gallery_id"], how="left")
    base["local_score"] = joined["local_score"].to_numpy(dtype=np.float64)
    base["n_matches"] = pd.array(joined["n_matches"].to_numpy(), dtype="Int32")
    table = pa.Table.from_pandas(base, preserve_index=False)

    # this run records manifest and feature errors afresh (failed images are retried);
    # match-stage errors of earlier runs stay while their image is still in the pairs
    recorded = {e["image_id"] for e in errors}
    for e in _stored(out_dir, ERRORS_DIR):
        if e["image_id"] in all_ids and e["image_id"] not in recorded:
            errors.append(e)
    for e in errors:
        if e.get("path") is None:
            e["path"] = paths.get(e["image_id"])
    err = errors_table(errors)
    err = pa.Table.from_pandas(
        err.to_pandas().drop_duplicates(ignore_index=True), schema=err.schema, preserve_index=False
    )
    stats["pairs_without_score"] = int(np.isnan(base["local_score"].to_numpy(np.float64)).sum())
    stats["errors"] = int(err.num_rows)
    stats["seconds"] = round(time.perf_counter() - t_start, 3)
    total = stats["seconds"]
    stats["pairs_per_s_end_to_end"] = round(matched / total, 3) if matched and total > 0 else None
    logger.info(
        "local scores: %d pairs (%d matched now, %s pairs/s), %d errors",
        len(pdf),
        matched,
        stats["pairs_per_s"],
        err.num_rows,
    )
    return ScoreResult(table, err, stats)
