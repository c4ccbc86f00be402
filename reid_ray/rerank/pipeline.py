"""The Ray wiring of re-ranking: features once per image, pairs through a matcher actor pool.

``score_pairs`` runs two Ray Data stages:

1. **features**: the images that the pairs need and the feature cache lacks (one listing
   finds them) go through an actor pool that decodes, crops, resizes and extracts, writing
   one cache entry per image. An image that cannot be used is recorded with its reason.
2. **matching**: the pairs, grouped by query, go through an actor pool
   (``ActorPoolStrategy``; one GPU per actor when the cluster has GPUs, the same code on the
   CPU). An actor loads a query's features once and matches it against its candidates in
   batches, then writes the scores of its batch of queries as one Parquet part file
   (atomically). A rerun reads the part files first and skips the queries whose pairs are
   all there, so an interrupted run resumes and no pair is scored twice.

Bad images never crash a batch: their pairs get a null ``local_score`` and the image gets a
row in the errors table. ``rerank`` and ``rerank_with_calibration`` add the calibrated
fusion of ``reid_ray.rerank.fusion`` on top.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reid_ray import io as rio
from reid_ray.errors import ConfigError, ImageError, ManifestError, OutputError
from reid_ray.rerank.config import RerankConfig
from reid_ray.rerank.fusion import FusionModel, fit_fusion, order_within_queries

logger = logging.getLogger(__name__)

#: progress(stage, done_increment, total): stage is "features" or "pairs".
Progress = Callable[[str, int, int], None]

SCORES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("gallery_id", pa.string()),
        ("local_score", pa.float64()),
        ("n_matches", pa.int32()),
    ]
)
STAGE_FEATURES = "rerank-features"
STAGE_MATCH = "rerank-match"
STAGE_MANIFEST = "rerank-manifest"


@dataclass
class ScoreResult:
    """``table``: the pairs with ``local_score`` (null where an image failed) and
    ``n_matches``; ``errors``: image_id, path, stage, reason; ``stats``: counts, timings."""

    table: pa.Table
    errors: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)


# -- inputs -------------------------------------------------------------------------------------


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


def _image_rows(manifest, ids: set[str]) -> pa.Table:
    t = manifest.table
    t = t.filter(pc.is_in(t["image_id"], value_set=pa.array(sorted(ids), pa.string())))
    cols = {"image_id": t["image_id"], "path": t["path"]}
    cols["bbox"] = (
        t["bbox"] if "bbox" in t.column_names else pa.nulls(t.num_rows, pa.list_(pa.float32(), 4))
    )
    cols["mask"] = t["mask"] if "mask" in t.column_names else pa.nulls(t.num_rows, pa.string())
    return pa.table(cols)


def _require_columns(table: pa.Table, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ConfigError(
            f"{what} lacks column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}"
        )


def read_table(path: str) -> pa.Table:
    """A Parquet file or a folder of Parquet files (local or s3://) as one table."""
    import pyarrow.parquet as pq

    fs, bare = rio.arrow_filesystem(path)
    try:
        return pq.read_table(bare, filesystem=fs)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"cannot read Parquet {path}: {exc}") from None


# -- pool sizing --------------------------------------------------------------------------------


def pool_settings(cfg: RerankConfig) -> dict[str, Any]:
    """Actor count and resources: one GPU per actor when there are GPUs; else one
    single-threaded actor per CPU, each reserving a fraction of a CPU so that half a CPU
    stays free for Ray Data's own tasks (whole CPUs per actor starve them on small nodes).

    torch/OpenCV threads = the whole CPUs reserved (at least 1), never more: on a busy
    2-core machine LightGlue with 2 threads took 1.5-5 s per pair against 0.14 s with one
    (OpenMP threads spin when the cores are oversubscribed), and pairs are independent, so
    more single-threaded actors use the CPUs better than fewer multi-threaded ones.
    """
    from reid_ray.runtime import cluster_cpus, cluster_gpus

    cpus = cluster_cpus()
    gpus = 0.0 if cfg.device == "cpu" else cluster_gpus()
    if cfg.device == "cuda" and gpus < 1 and cfg.gpus_per_actor <= 0:
        raise ConfigError("device 'cuda' requested but the Ray cluster has no GPU")
    if gpus >= 1 or cfg.gpus_per_actor > 0:
        num_gpus = float(cfg.gpus_per_actor or 1.0)
        size = cfg.actors or max(1, int(gpus // num_gpus))
        num_cpus = float(cfg.cpus_per_actor or 1.0)
    else:
        num_gpus = 0.0
        size = cfg.actors or max(1, int(cpus))
        num_cpus = float(cfg.cpus_per_actor or max(0.25, min(4.0, (cpus - 0.5) / size)))
    return {
        "size": int(size),
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "threads": max(1, int(num_cpus)),
    }


def _set_threads(n: int) -> None:
    import cv2
    import torch

    torch.set_num_threads(max(1, int(n)))
    cv2.setNumThreads(max(1, int(n)))


# -- actors -------------------------------------------------------------------------------------


class FeatureActor:
    """Decode, crop, resize and extract one batch of images into the feature cache."""

    def __init__(self, cfg: dict, cache_root: str, fingerprint: str, threads: int = 1) -> None:
        from reid_ray.rerank.cache import FeatureCache
        from reid_ray.rerank.config import load_rerank_config
        from reid_ray.rerank.features import build_extractor, resolve_device

        _set_threads(threads)
        self.cfg = load_rerank_config(cfg)
        self.device = resolve_device(self.cfg.device)
        self.extractor = build_extractor(self.cfg, self.device)
        self.cache = FeatureCache(cache_root, fingerprint, memory_items=0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reid_ray.rerank.features import load_prepared

        out: dict[str, list] = {
            "image_id": [],
            "ok": [],
            "reason": [],
            "keypoints": [],
            "seconds": [],
        }
        for row in batch.to_pylist():
            t0 = time.perf_counter()
            reason, n = None, 0
            try:
                img, mask, scale = load_prepared(row, self.cfg)
                feats = self.extractor.extract(img, mask, scale)
                self.cache.put(row["image_id"], feats)
                n = len(feats)
            except ImageError as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - one bad image never stops the batch
                logger.exception("feature extraction failed for %s", row["image_id"])
                reason = f"feature extraction failed: {type(exc).__name__}: {exc}"
            out["image_id"].append(row["image_id"])
            out["ok"].append(reason is None)
            out["reason"].append(reason)
            out["keypoints"].append(n)
            out["seconds"].append(time.perf_counter() - t0)
        return pa.table(
            out,
            schema=pa.schema(
                [
                    ("image_id", pa.string()),
                    ("ok", pa.bool_()),
                    ("reason", pa.string()),
                    ("keypoints", pa.int64()),
                    ("seconds", pa.float64()),
                ]
            ),
        )


class MatchActor:
    """Match each query of a batch against its candidates; write one part file per batch."""

    def __init__(
        self,
        cfg: dict,
        cache_root: str,
        fingerprint: str,
        out_dir: str,
        unavailable: dict[str, str],
        threads: int = 1,
        memory_items: int = 512,
    ) -> None:
        from reid_ray.rerank.cache import FeatureCache
        from reid_ray.rerank.config import load_rerank_config
        from reid_ray.rerank.features import resolve_device
        from reid_ray.rerank.matchers import PairScorer

        _set_threads(threads)
        self.cfg = load_rerank_config(cfg)
        self.device = resolve_device(self.cfg.device)
        self.scorer = PairScorer(self.cfg, self.device)
        self.cache = FeatureCache(cache_root, fingerprint, memory_items=memory_items)
        self.out_dir = out_dir
        self.unavailable = dict(unavailable)

    def _features(self, image_id: str, errors: list[dict]):
        if image_id in self.unavailable:
            return None
        feats = self.cache.get(image_id)
        if feats is None:
            errors.append(
                {
                    "image_id": image_id,
                    "path": None,
                    "stage": STAGE_MATCH,
                    "reason": "features missing from the cache",
                }
            )
            self.unavailable[image_id] = "features missing from the cache"
        return feats

    def __call__(self, batch: pa.Table) -> pa.Table:
        q_out, g_out, s_out, n_out, errors = [], [], [], [], []
        summary: dict[str, list] = {"query_id": [], "pairs": [], "scored": [], "seconds": []}
        for row in batch.to_pylist():
            t0 = time.perf_counter()
            q, gids = row["query_id"], list(row["gallery_ids"])
            qf = self._features(q, errors)
            scores: list[tuple[float | None, int | None]] = [(None, None)] * len(gids)
            if qf is not None:
                cands = [(i, self._features(g, errors)) for i, g in enumerate(gids)]
                cands = [(i, f) for i, f in cands if f is not None]
                try:
                    for (i, _), sc in zip(
                        cands, self.scorer.score(qf, [f for _, f in cands]), strict=True
                    ):
                        scores[i] = sc
                except Exception as exc:  # noqa: BLE001 - recorded, never crashes the batch
                    logger.exception("matching failed for query %s", q)
                    errors.append(
                        {
                            "image_id": q,
                            "path": None,
                            "stage": STAGE_MATCH,
                            "reason": f"matching failed: {type(exc).__name__}: {exc}",
                        }
                    )
            for g, (s, n) in zip(gids, scores, strict=True):
                q_out.append(q)
                g_out.append(g)
                s_out.append(s)
                n_out.append(n)
            summary["query_id"].append(q)
            summary["pairs"].append(len(gids))
            summary["scored"].append(sum(s is not None for s, _ in scores))
            summary["seconds"].append(time.perf_counter() - t0)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        if errors:
            from reid_ray.data import errors_table

            rio.write_table_atomic(rio.join(self.out_dir, "errors", name), errors_table(errors))
        rio.write_table_atomic(
            rio.join(self.out_dir, "pairs", name),
            pa.table(
                {"query_id": q_out, "gallery_id": g_out, "local_score": s_out, "n_matches": n_out},
                schema=SCORES_SCHEMA,
            ),
        )
        return pa.table(
            summary,
            schema=pa.schema(
                [
                    ("query_id", pa.string()),
                    ("pairs", pa.int64()),
                    ("scored", pa.int64()),
                    ("seconds", pa.float64()),
                ]
            ),
        )


# -- stored state -------------------------------------------------------------------------------


def _read_parts(out_dir: str, sub: str, schema: pa.Schema) -> pa.Table:
    import pyarrow.parquet as pq

    files = rio.list_files(rio.join(out_dir, sub), ".parquet")
    if sub == "errors":  # an errors file counts only with its pairs file (written after it)
        done = {
            f.rsplit("/", 1)[-1] for f in rio.list_files(rio.join(out_dir, "pairs"), ".parquet")
        }
        files = [f for f in files if f.rsplit("/", 1)[-1] in done]
    tables = []
    for f in files:
        fs, bare = rio.arrow_filesystem(f)
        tables.append(pq.read_table(bare, filesystem=fs, schema=schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def _check_settings(out_dir: str, settings: dict[str, Any], overwrite: bool) -> None:
    path = rio.join(out_dir, "scoring.json")
    if overwrite:
        for sub in ("pairs", "errors"):
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


# -- score_pairs --------------------------------------------------------------------------------


def score_pairs(
    pairs: pa.Table,
    manifest: Any,
    cfg: RerankConfig,
    out_dir: str,
    progress: Progress | None = None,
) -> pa.Table:
    """``pairs`` (query_id, gallery_id, ...) with ``local_score`` and ``n_matches`` added.

    See ``score_pairs_detailed`` (this returns its ``table``).
    """
    return score_pairs_detailed(pairs, manifest, cfg, out_dir, progress=progress).table


def score_pairs_detailed(
    pairs: pa.Table,
    manifest: Any,
    cfg: RerankConfig,
    out_dir: str,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> ScoreResult:
    """Local scores for ``pairs`` on the Ray actor pools (module doc); resumable in ``out_dir``.

    ``out_dir`` holds ``scoring.json`` (the settings; a rerun with other settings raises
    ``OutputError`` unless ``overwrite``), ``pairs/part-*.parquet`` and
    ``errors/part-*.parquet``. Features go to ``cfg.cache_dir`` (default
    ``<out_dir>/features``).
    """
    import pandas as pd

    from reid_ray.data import errors_table
    from reid_ray.rerank.cache import FeatureCache
    from reid_ray.rerank.features import feature_fingerprint
    from reid_ray.runtime import init_ray

    t_start = time.perf_counter()
    _require_columns(pairs, ("query_id", "gallery_id"), "the pairs table")
    manifest = as_manifest(manifest)
    fingerprint = feature_fingerprint(cfg)
    cache_root = cfg.cache_dir or rio.join(out_dir, "features")
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
        "images_to_extract": len(missing),
        "fingerprint": fingerprint,
        "actors": 0,
        "cpus_per_actor": None,
        "gpus_per_actor": None,
    }
    pool: dict[str, Any] = {}

    def start_pool() -> None:  # Ray only when there is work: a finished rerun needs none
        if not pool:
            init_ray()
            pool.update(pool_settings(cfg))
            stats.update(
                actors=pool["size"],
                cpus_per_actor=pool["num_cpus"],
                gpus_per_actor=pool["num_gpus"],
            )

    t0 = time.perf_counter()
    extracted = 0
    if missing:
        start_pool()
        import ray

        todo_rows = _image_rows(manifest, set(missing))
        ds = ray.data.from_arrow(_chunks(todo_rows, 4)).map_batches(
            FeatureActor,
            fn_constructor_kwargs={
                "cfg": cfg.to_dict(),
                "cache_root": cache_root,
                "fingerprint": fingerprint,
                "threads": pool["threads"],
            },
            compute=ray.data.ActorPoolStrategy(size=pool["size"]),
            num_cpus=pool["num_cpus"],
            num_gpus=pool["num_gpus"],
            batch_size=4,
            batch_format="pyarrow",
        )
        for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
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
                progress("features", out.num_rows, len(missing))
    stats["images_extracted"] = extracted
    stats["extract_seconds"] = round(time.perf_counter() - t0, 3)

    # 2. which queries are finished (resume): every pair present, and no null score that an
    #    image now available could fill
    done = _read_parts(out_dir, "pairs", SCORES_SCHEMA).to_pandas()
    done = done.drop_duplicates(["query_id", "gallery_id"], keep="last")
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
    stats["pairs_to_match"] = int(len(todo))

    # 3. matching, grouped by query
    t0 = time.perf_counter()
    matched, busy = 0, 0.0
    if len(todo):
        start_pool()
        import ray

        grouped = todo.groupby("query_id", sort=False)["gallery_id"].apply(list).reset_index()
        grouped = pa.table(
            {
                "query_id": pa.array(grouped["query_id"], pa.string()),
                "gallery_ids": pa.array(grouped["gallery_id"], pa.list_(pa.string())),
            }
        )
        ds = ray.data.from_arrow(_chunks(grouped, cfg.queries_per_batch)).map_batches(
            MatchActor,
            fn_constructor_kwargs={
                "cfg": cfg.to_dict(),
                "cache_root": cache_root,
                "fingerprint": fingerprint,
                "out_dir": out_dir,
                "unavailable": unavailable,
                "threads": pool["threads"],
            },
            compute=ray.data.ActorPoolStrategy(size=pool["size"]),
            num_cpus=pool["num_cpus"],
            num_gpus=pool["num_gpus"],
            batch_size=cfg.queries_per_batch,
            batch_format="pyarrow",
        )
        for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            n = int(pc.sum(out["pairs"]).as_py() or 0)
            matched += n
            busy += float(pc.sum(out["seconds"]).as_py() or 0.0)
            if progress:
                progress("pairs", n, len(todo))
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
    scores = _read_parts(out_dir, "pairs", SCORES_SCHEMA).to_pandas()
    scores = scores.drop_duplicates(["query_id", "gallery_id"], keep="last")
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
    for e in _read_parts(out_dir, "errors", errors_table([]).schema).to_pylist():
        if e["image_id"] in all_ids and e["image_id"] not in recorded:
            errors.append(e)
    for e in errors:
        if e.get("path") is None:
            e["path"] = paths.get(e["image_id"])
    err = errors_table(errors)
    err = pa.Table.from_pandas(
        err.to_pandas().drop_duplicates(ignore_index=True), schema=err.schema, preserve_index=False
    )
    stats["pairs_without_score"] = int(
        np.isnan(base["local_score"].to_numpy(dtype=np.float64)).sum()
    )
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


# -- rerank -------------------------------------------------------------------------------------


def _rank_order(df) -> np.ndarray:
    """Position of each row within its query by the input ``rank`` (else by global score)."""
    key = (
        df["rank"].to_numpy(dtype=np.float64)
        if "rank" in df.columns
        else -df["score"].to_numpy(dtype=np.float64)
    )
    order = np.lexsort((key, df["query_id"].to_numpy()))
    pos = np.empty(len(df), dtype=np.int64)
    qs = df["query_id"].to_numpy()[order]
    starts = (
        np.r_[0, np.nonzero(qs[1:] != qs[:-1])[0] + 1] if len(qs) else np.array([], dtype=np.int64)
    )
    counts = np.diff(np.r_[starts, len(qs)])
    pos[order] = np.arange(len(qs)) - np.repeat(starts, counts)
    return pos


def rerank(
    candidates: pa.Table,
    manifest: Any,
    cfg: RerankConfig,
    out_dir: str,
    fusion: FusionModel | None,
    progress: Progress | None = None,
) -> pa.Table:
    """Re-rank each query's top ``cfg.top_k`` candidates by the calibrated fusion.

    ``candidates``: query_id, gallery_id, score (global cosine), rank (optional) and, if
    already scored, local_score. Returns the candidates with ``local_score``,
    ``n_matches``, ``fused_score`` (the ranking key), ``probability`` (calibrated P(same
    individual)) and ``new_rank`` (same base as ``rank``; 1 without it), sorted by query
    and new rank. Candidates beyond ``top_k`` keep their global order after the re-ranked
    ones. Raises ``ConfigError`` without a calibrated ``fusion``.
    """
    if not isinstance(fusion, FusionModel):
        raise ConfigError(
            "re-ranking needs a calibrated fusion model (fit_fusion on labelled gallery pairs, or "
            "reid-ray rerank --calibration / --fusion); refusing to rank by uncalibrated scores"
        )
    _require_columns(candidates, ("query_id", "gallery_id", "score"), "the candidates table")
    df = candidates.to_pandas()
    df["query_id"] = df["query_id"].astype(str)
    df["gallery_id"] = df["gallery_id"].astype(str)
    pos = _rank_order(df)
    in_top = pos < cfg.top_k
    if "local_score" not in df.columns:
        top = pa.Table.from_pandas(df.loc[in_top, ["query_id", "gallery_id"]], preserve_index=False)
        scored = score_pairs(
            top, manifest, cfg, rio.join(out_dir, "scores"), progress=progress
        ).to_pandas()
        scored = scored.drop_duplicates(["query_id", "gallery_id"])
        df = df.merge(
            scored[["query_id", "gallery_id", "local_score", "n_matches"]],
            on=["query_id", "gallery_id"],
            how="left",
        )
    elif "n_matches" not in df.columns:
        df["n_matches"] = None
    local = df["local_score"].to_numpy(dtype=np.float64, na_value=np.nan)
    local = np.where(in_top, local, np.nan)
    glob = df["score"].to_numpy(dtype=np.float64)
    fused = fusion.fused_score(glob, local)
    prob = fusion.predict_proba(glob, local)
    df["local_score"] = local
    df["fused_score"] = fused
    df["probability"] = prob
    # re-ranked block first (by fused then global), then the rest in their global order
    _, qidx = np.unique(df["query_id"].to_numpy(), return_inverse=True)
    primary = np.where(in_top, fused + 2.0, -pos.astype(np.float64) * 1e-9 - 1.0)
    order = order_within_queries(qidx, primary, glob)
    df = df.iloc[order].reset_index(drop=True)
    qs = df["query_id"].to_numpy()
    starts = (
        np.r_[0, np.nonzero(qs[1:] != qs[:-1])[0] + 1] if len(qs) else np.array([], dtype=np.int64)
    )
    new_pos = np.arange(len(qs)) - np.repeat(starts, np.diff(np.r_[starts, len(qs)]))
    base = (
        int(np.nanmin(df["rank"].to_numpy(dtype=np.float64)))
        if "rank" in df.columns and len(df)
        else 1
    )
    df["new_rank"] = new_pos + base
    return pa.Table.from_pandas(df, preserve_index=False)


def top_predictions(reranked: pa.Table, manifest: Any, fusion: FusionModel) -> pa.Table:
    """One row per query: the top candidate after re-ranking, its identity, probability and
    the known-vs-new decision (``is_new``: probability below the fusion threshold)."""
    df = reranked.to_pandas()
    rank_col = "new_rank" if "new_rank" in df.columns else "rank"
    top = df.sort_values(["query_id", rank_col]).drop_duplicates("query_id", keep="first")
    ident = _identities(as_manifest(manifest))
    prob = top["probability"].to_numpy(dtype=np.float64)
    is_new = fusion.is_new(prob)
    identity = [
        None if new else ident.get(g) for g, new in zip(top["gallery_id"], is_new, strict=True)
    ]
    return pa.table(
        {
            "query_id": pa.array(top["query_id"].astype(str), pa.string()),
            "gallery_id": pa.array(top["gallery_id"].astype(str), pa.string()),
            "predicted_identity": pa.array(identity, pa.string()),
            "probability": pa.array(prob, pa.float64()),
            "is_new": pa.array(is_new, pa.bool_()),
        }
    )


def _identities(manifest) -> dict[str, str]:
    t = manifest.table
    return {
        i: v
        for i, v in zip(t["image_id"].to_pylist(), t["identity"].to_pylist(), strict=True)
        if v is not None
    }


def select_calibration_pairs(gallery_candidates: pa.Table, manifest: Any, cfg: RerankConfig):
    """Labelled gallery-vs-gallery pairs for calibration (a pandas frame with ``same``):
    self-pairs and unlabelled images dropped, each query's first ``calibration_top_k``
    candidates, at most ``calibration_queries`` queries (seeded sample)."""
    _require_columns(
        gallery_candidates, ("query_id", "gallery_id", "score"), "the gallery candidates"
    )
    ident = _identities(as_manifest(manifest))
    df = gallery_candidates.to_pandas()
    df["query_id"] = df["query_id"].astype(str)
    df["gallery_id"] = df["gallery_id"].astype(str)
    df = df[
        (df["query_id"] != df["gallery_id"])
        & df["query_id"].isin(ident)
        & df["gallery_id"].isin(ident)
    ]
    df = df.reset_index(drop=True)
    df = df[_rank_order(df) < cfg.calibration_top_k]
    queries = np.array(sorted(df["query_id"].unique()))
    if len(queries) > cfg.calibration_queries:
        rng = np.random.default_rng(cfg.seed)
        queries = np.sort(rng.choice(queries, size=cfg.calibration_queries, replace=False))
        df = df[df["query_id"].isin(set(queries))]
    df = df.reset_index(drop=True)
    df["same"] = [
        ident[q] == ident[g] for q, g in zip(df["query_id"], df["gallery_id"], strict=True)
    ]
    return df


def rerank_with_calibration(
    query_candidates: pa.Table,
    gallery_candidates: pa.Table,
    manifest: Any,
    cfg: RerankConfig,
    out_dir: str,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> tuple[pa.Table, FusionModel, dict[str, Any]]:
    """Score the query candidates and labelled gallery pairs in one pass, fit the fusion on
    the gallery pairs, re-rank the queries. Writes ``fusion.json`` to ``out_dir``.

    Returns ``(reranked, fusion, info)``; ``info`` holds the scoring stats, the errors
    table (``info["errors"]``), the calibration counts and the chosen fusion weight.
    """
    import pandas as pd

    manifest = as_manifest(manifest)
    _require_columns(query_candidates, ("query_id", "gallery_id", "score"), "the query candidates")
    calib = select_calibration_pairs(gallery_candidates, manifest, cfg)
    qdf = query_candidates.to_pandas()
    qdf["query_id"] = qdf["query_id"].astype(str)
    qdf["gallery_id"] = qdf["gallery_id"].astype(str)
    qtop = qdf[_rank_order(qdf) < cfg.top_k]
    both = pd.concat(
        [calib[["query_id", "gallery_id"]], qtop[["query_id", "gallery_id"]]]
    ).drop_duplicates()
    result = score_pairs_detailed(
        pa.Table.from_pandas(both, preserve_index=False),
        manifest,
        cfg,
        rio.join(out_dir, "scores"),
        progress=progress,
        overwrite=overwrite,
    )
    scored = result.table.to_pandas()[["query_id", "gallery_id", "local_score", "n_matches"]]
    calib = calib.merge(scored, on=["query_id", "gallery_id"], how="left")
    fusion = fit_fusion(
        calib["score"].to_numpy(np.float64),
        calib["local_score"].to_numpy(np.float64, na_value=np.nan),
        calib["same"].to_numpy(bool),
        calib["query_id"].to_numpy(),
        method=cfg.calibration,
        threshold=cfg.threshold,
        seed=cfg.seed,
    )
    fusion.save(rio.join(out_dir, "fusion.json"))
    qdf = qdf.merge(scored, on=["query_id", "gallery_id"], how="left")
    reranked = rerank(
        pa.Table.from_pandas(qdf, preserve_index=False), manifest, cfg, out_dir, fusion
    )
    info = {
        "scoring": result.stats,
        "errors": result.errors,
        "calibration_pairs": int(len(calib)),
        "calibration_same_pairs": int(calib["same"].sum()),
        "calibration_queries": int(calib["query_id"].nunique()),
        "fusion_weight": fusion.weight,
        "threshold": fusion.threshold,
        "fusion": fusion.to_dict(),
    }
    return reranked, fusion, info
