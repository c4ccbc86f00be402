"""The benchmark protocol: embed, index the gallery, search the queries, score.

``evaluate`` embeds the ``query``, ``gallery`` and ``query_unknown`` rows of a split once
(cached under ``OUT/embed``, so a rerun reuses them), builds the FAISS index of the gallery,
searches every query (top ``k``, default 100) and writes:

- ``OUT/candidates/part-*.parquet``: the query candidates (query_id, rank, gallery_id,
  score), which re-ranking starts from;
- ``OUT/metrics.json`` (last): ``top1``, ``top5``, ``top20``, ``mAP`` over the ``query``
  rows; with ``query_unknown`` rows also ``baks``, ``baus`` and the ``threshold`` used, plus
  counts, the model, timings and how the threshold was chosen.

The open-set threshold is chosen without looking at the queries: leave-one-out on the
gallery (``reid_ray.evaluation.metrics.select_threshold_loo`` over each gallery item's
neighbours among the other gallery items), exactly what a nightly job without labels can do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
EMBED_DIR = "embed"
CANDIDATES_DIR = "candidates"
GALLERY_CANDIDATES_DIR = "gallery_candidates"
EVAL_SPLITS = ("query", "gallery", "query_unknown")
KS = (1, 5, 20)
QUERIES_PER_PART = 10_000


def _identities(ids: np.ndarray, identity_of: dict[str, str | None]) -> np.ndarray:
    """Map an array of image ids (``None`` pads) to identities, keeping the shape."""
    flat = [None if i is None else identity_of.get(i) for i in np.asarray(ids).ravel().tolist()]
    return np.asarray(flat, dtype=object).reshape(np.shape(ids))


def score_ranking(
    query_ids: np.ndarray,
    scores: np.ndarray,
    cand_ids: np.ndarray,
    identity_of: dict[str, str | None],
    gallery_identities: np.ndarray,
    *,
    unknown_ids: set[str],
    threshold: float | None,
) -> dict[str, Any]:
    """Retrieval metrics of the ``query`` rows and, when there are ``query_unknown`` rows
    and a finite threshold, BAKS/BAUS of all queries. Pure; used for the global ranking
    and for a re-ranked one.

    ``scores``/``cand_ids``: [Q, K] best first (``-inf``/``None`` pads); ``identity_of``
    maps image ids to identities; ``gallery_identities``: identity of every indexed item.
    """
    from reid_ray.evaluation.metrics import (
        open_set_metrics,
        predict_with_threshold,
        retrieval_metrics,
    )

    qids = np.asarray(query_ids, dtype=object)
    true = _identities(qids, identity_of)
    ranked = _identities(cand_ids, identity_of)
    values, counts = np.unique(np.asarray(gallery_identities, dtype=str), return_counts=True)
    count_of = dict(zip(values.tolist(), counts.tolist(), strict=True))
    known_rows = np.array([q not in unknown_ids for q in qids.tolist()], dtype=bool)
    n_rel = np.array([count_of.get(str(t), 0) for t in true[known_rows].tolist()], dtype=np.int64)
    out: dict[str, Any] = dict(retrieval_metrics(true[known_rows], ranked[known_rows], n_rel, KS))
    out["n_queries_without_match"] = int((n_rel == 0).sum())
    if unknown_ids:
        if threshold is None or not np.isfinite(threshold):
            out.update(baks=None, baus=None)
        else:
            top_scores = scores[:, 0] if scores.shape[1] else np.full(len(qids), -np.inf)
            top_ids = ranked[:, 0] if ranked.shape[1] else np.full(len(qids), None, dtype=object)
            predicted = predict_with_threshold(top_scores, top_ids, float(threshold))
            open_set = open_set_metrics(true, predicted, set(count_of))
            out.update(
                baks=open_set["baks"],
                baus=open_set["baus"],
                n_known=open_set["n_known"],
                n_unknown=open_set["n_unknown"],
            )
    return out


def _write_candidates(folder: str, query_ids, scores, cand_ids) -> int:
    from reid_ray.index.candidates import candidates_table

    rio.remove(folder, recursive=True)
    n = 0
    for part, start in enumerate(range(0, len(query_ids), QUERIES_PER_PART)):
        stop = start + QUERIES_PER_PART
        table = candidates_table(query_ids[start:stop], scores[start:stop], cand_ids[start:stop])
        rio.write_table_atomic(rio.join(folder, f"part-{part:05d}.parquet"), table)
        n += table.num_rows
    return n


def _run_rerank(rerank: Any, **kwargs) -> dict[str, Any]:
    """The re-ranking hook.

    ``rerank`` is True (``reid_ray.rerank.rerank_with_calibration`` with default settings),
    a ``RerankConfig``, or a callable with the signature of ``rerank_with_calibration``
    (query_candidates, gallery_candidates, manifest, cfg, out_dir). The result is either
    ``rerank_with_calibration``'s ``(reranked, fusion, info)`` -- ranked by ``new_rank``,
    scored by the calibrated ``probability``, thresholded at ``fusion.threshold`` -- or a
    dict / object with ``candidates`` (query_id, rank, gallery_id, score) and ``threshold``.
    """
    if callable(rerank) and not isinstance(rerank, bool):
        fn, cfg = rerank, None
    else:
        try:
            from reid_ray.rerank import load_rerank_config
            from reid_ray.rerank import rerank_with_calibration as fn
        except ImportError as exc:
            raise ConfigError(f"--rerank: the re-ranking stage is not available ({exc})") from None
        cfg = load_rerank_config() if rerank is True else rerank
    result = fn(cfg=cfg, **kwargs)
    if isinstance(result, tuple) and len(result) == 3:
        reranked, fusion, info = result
        table = pa.table(
            {
                "query_id": reranked["query_id"].cast(pa.string()),
                "rank": reranked["new_rank"].cast(pa.int32()),
                "gallery_id": reranked["gallery_id"].cast(pa.string()),
                "score": reranked["probability"].cast(pa.float32()),
            }
        )
        info = dict(info)
        errors = info.pop("errors", None)
        info["errors"] = int(errors.num_rows) if errors is not None else 0
        info["ranking"] = "fused score; score = calibrated P(same individual)"
        return {"candidates": table, "threshold": float(fusion.threshold), "info": info}
    if isinstance(result, pa.Table):
        return {"candidates": result, "threshold": None, "info": {}}
    if isinstance(result, dict):
        return {
            "candidates": result["candidates"],
            "threshold": result.get("threshold"),
            "info": {k: v for k, v in result.items() if k not in ("candidates", "threshold")},
        }
    return {
        "candidates": result.candidates,
        "threshold": getattr(result, "threshold", None),
        "info": getattr(result, "info", {}) or {},
    }


def evaluate(
    manifest_path: str,
    split_path: str | None,
    model_ref: str,
    out: str,
    *,
    rerank: Any = None,
    image_size: int | None = None,
    embed_cfg=None,
    k: int = 100,
    exact_threshold: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark protocol and write ``OUT/metrics.json``; returns the metrics.

    Args:
        manifest_path: the manifest (CSV/Parquet, local or s3://).
        split_path: a split file (``image_id,split``); None uses the manifest's ``split``.
        model_ref: any model reference (``timm:NAME``, ``hf-hub:ORG/NAME``, checkpoint).
        out: output folder (local or s3://).
        rerank: None (global ranking only), True / a re-rank config (re-rank the
            candidates with ``reid_ray.rerank``), or a callable with the same signature as
            ``rerank_with_calibration``; the top-level metrics are then the re-ranked ones,
            the global ones stay under ``global``.
        image_size: override of the model's input side.
        embed_cfg: an ``EmbedConfig`` (its ``image_size`` is replaced by ``image_size``
            when given).
        k: candidates per query (capped at the gallery size).
        exact_threshold: gallery size up to which search is exact (default: the index's).
        overwrite: replace cached embeddings of another model in ``OUT/embed``.
        progress: ``progress(done, total)`` during embedding.
    """
    from reid_ray.data import read_manifest
    from reid_ray.data.manifest import Manifest
    from reid_ray.embed import EmbedConfig, read_embeddings
    from reid_ray.embed.pipeline import embed_manifest
    from reid_ray.evaluation.metrics import select_threshold_loo
    from reid_ray.index import DEFAULT_EXACT_THRESHOLD, build_index, search

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    t0 = time.perf_counter()
    cfg = embed_cfg or EmbedConfig()
    if image_size is not None:
        cfg = cfg.replace(image_size=int(image_size))
    manifest = read_manifest(manifest_path, split_file=split_path)
    selected = manifest.select_splits(*EVAL_SPLITS)
    split_col = selected.table["split"].to_pylist()
    counts = {name: split_col.count(name) for name in EVAL_SPLITS}
    if counts["gallery"] == 0 or counts["query"] + counts["query_unknown"] == 0:
        where = f"split file {split_path}" if split_path else f"the split column of {manifest_path}"
        raise ConfigError(
            f"{where} gives {counts['gallery']} gallery and "
            f"{counts['query'] + counts['query_unknown']} query rows: evaluate needs both "
            "(split names: query, gallery, query_unknown)"
        )
    ids_all = selected.table["image_id"].to_pylist()
    identity_of = dict(zip(ids_all, selected.table["identity"].to_pylist(), strict=True))
    split_of = dict(zip(ids_all, split_col, strict=True))
    unlabelled = [i for i in ids_all if identity_of[i] is None]
    if unlabelled:
        raise ConfigError(
            f"{len(unlabelled)} query/gallery row(s) have no identity (e.g. {unlabelled[0]!r}): "
            "evaluation needs labelled rows"
        )
    rio.makedirs(out)
    rio.remove(rio.join(out, METRICS_FILE))

    # 1. embed (cached, resumable)
    t = time.perf_counter()
    embed_out = rio.join(out, EMBED_DIR)
    summary = embed_manifest(
        Manifest(selected.table, manifest.errors, list(manifest.warnings), manifest.source),
        model_ref,
        embed_out,
        cfg,
        overwrite=overwrite,
        progress=progress,
        command=command or "evaluate",
    )
    embed_seconds = time.perf_counter() - t
    emb = read_embeddings(embed_out, ids=ids_all)
    row_of = {i: n for n, i in enumerate(emb.ids.tolist())}

    def rows(split: str) -> np.ndarray:
        return np.array([n for i, n in row_of.items() if split_of[i] == split], dtype=np.int64)

    g_rows, q_rows, u_rows = rows("gallery"), rows("query"), rows("query_unknown")
    embedded = {"query": q_rows, "gallery": g_rows, "query_unknown": u_rows}
    missing = {s: counts[s] - len(embedded[s]) for s in EVAL_SPLITS}
    if len(g_rows) == 0:
        raise ConfigError("no gallery image could be embedded (see OUT/embed/errors)")
    gallery_ids = emb.ids[g_rows]
    gallery_identities = _identities(gallery_ids, identity_of)

    # 2. index + search
    t = time.perf_counter()
    index = build_index(
        emb.matrix[g_rows],
        gallery_ids,
        key=emb.key,
        exact_threshold=exact_threshold or DEFAULT_EXACT_THRESHOLD,
    )
    index_seconds = time.perf_counter() - t
    t = time.perf_counter()
    k_eff = min(k, len(g_rows))
    qu_rows = np.concatenate([q_rows, u_rows])
    query_ids = emb.ids[qu_rows]
    scores, cand = search(index, emb.matrix[qu_rows], k_eff)
    n_candidates = _write_candidates(rio.join(out, CANDIDATES_DIR), query_ids, scores, cand)
    # leave-one-out neighbours of every gallery item, for the threshold (and calibration)
    k_loo = min(k, len(g_rows) - 1)
    if k_loo >= 1:
        loo_scores, loo_ids = search(
            index, emb.matrix[g_rows], k_loo, query_ids=gallery_ids, exclude_self=True
        )
    else:
        loo_scores = np.full((len(g_rows), 1), -np.inf, dtype=np.float32)
        loo_ids = np.full((len(g_rows), 1), None, dtype=object)
    _write_candidates(rio.join(out, GALLERY_CANDIDATES_DIR), gallery_ids, loo_scores, loo_ids)
    search_seconds = time.perf_counter() - t

    # 3. threshold (gallery only) and metrics
    threshold, threshold_info = select_threshold_loo(
        loo_scores, _identities(loo_ids, identity_of), gallery_identities
    )
    unknown_ids = set(emb.ids[u_rows].tolist())
    global_metrics = score_ranking(
        query_ids,
        scores,
        cand,
        identity_of,
        gallery_identities,
        unknown_ids=unknown_ids,
        threshold=threshold,
    )
    metrics: dict[str, Any] = dict(global_metrics)
    if unknown_ids:
        metrics["threshold"] = threshold
    rerank_info = None
    if rerank:
        from reid_ray.index.candidates import candidates_to_matrix, read_candidates

        t = time.perf_counter()
        result = _run_rerank(
            rerank,
            query_candidates=read_candidates(rio.join(out, CANDIDATES_DIR)),
            gallery_candidates=read_candidates(rio.join(out, GALLERY_CANDIDATES_DIR)),
            manifest=selected,
            out_dir=rio.join(out, "rerank"),
        )
        r_scores, r_ids = candidates_to_matrix(result["candidates"], query_ids, k_eff)
        r_threshold = result["threshold"]
        reranked = score_ranking(
            query_ids,
            r_scores,
            r_ids,
            identity_of,
            gallery_identities,
            unknown_ids=unknown_ids,
            threshold=r_threshold,
        )
        metrics = dict(reranked)
        if unknown_ids:
            metrics["threshold"] = r_threshold
        metrics["global"] = {**global_metrics, "threshold": threshold}
        rerank_info = {"seconds": time.perf_counter() - t, **result["info"]}

    metrics.update(
        {
            "command": command or "evaluate",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "manifest": manifest_path,
            "split": split_path,
            "model": {
                "ref": model_ref,
                "description": summary.description,
                "fingerprint": summary.fingerprint,
                "key": summary.key,
                "embedding_dim": summary.embedding_dim,
            },
            "config": {"k": k, "embed": cfg.to_dict(), "rerank": bool(rerank)},
            "counts": {
                **{f"{s}_rows": counts[s] for s in EVAL_SPLITS},
                **{f"{s}_missing": missing[s] for s in EVAL_SPLITS},
                "gallery_identities": int(len(set(gallery_identities.tolist()))),
                "embed_errors": summary.n_errors,
                "manifest_errors": summary.n_manifest_errors,
                "candidates": n_candidates,
            },
            "index": {"kind": index.kind, "n": len(index), "k": k_eff},
            "threshold_selection": {
                "method": "leave-one-out on the gallery: each gallery item queries the "
                "others, once as a known sample and once as if its individual were new; "
                "the threshold maximises (BAKS + BAUS) / 2 of that simulation. "
                "No query is looked at.",
                "threshold": threshold,
                **threshold_info,
            },
            "rerank": rerank_info,
            "timings": {
                "embed_seconds": embed_seconds,
                "embed_images_per_second": summary.images_per_second,
                "index_seconds": index_seconds,
                "search_seconds": search_seconds,
                "total_seconds": time.perf_counter() - t0,
            },
            "metrics_measure": "top-k: fraction of query rows whose first correct gallery "
            "image is within the first k candidates; mAP over the query rows (relevant = "
            "gallery images of the same identity); baks/baus: balanced accuracy on known/"
            "unknown individuals over query + query_unknown rows, with the threshold above.",
        }
    )
    rio.write_json_atomic(rio.join(out, METRICS_FILE), metrics)
    logger.info(
        "evaluate %s: top1 %.3f mAP %.3f (%d queries, gallery %d)",
        model_ref,
        metrics.get("top1") or float("nan"),
        metrics.get("mAP") or float("nan"),
        len(query_ids),
        len(g_rows),
    )
    return metrics
