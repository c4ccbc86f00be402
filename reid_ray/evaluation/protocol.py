"""The benchmark protocol: embed, index the gallery, search the queries, score.

``evaluate`` embeds the ``query``, ``gallery`` and ``query_unknown`` rows of a split once
(cached under ``OUT/embed``, so a rerun reuses them), builds the FAISS index of the gallery,
searches every query (top ``k``, default 100) and writes:

- ``OUT/candidates/part-*.parquet``: the query candidates (query_id, rank, gallery_id,
  score), which re-ranking starts from;
- ``OUT/metrics.json`` (last): ``top1``, ``top5``, ``top20``, ``mAP`` over the ``query``
  rows; with ``query_unknown`` rows also ``baks``, ``baus``, the ``threshold`` used and the
  threshold-free ``auroc_known_unknown`` (top-1 score of known vs unknown queries), plus the
  known-vs-new decision record (``open_set``), its plot (``open_set_plot``), counts, the
  model and timings;
- ``OUT/open_set.png``: BAKS/BAUS against the threshold, simulated and observed.

The known-vs-new decision is fitted without looking at the queries (:mod:`reid_ray.decide`):
the gallery plays queries with their own image or their whole identity (and session, with
a ``date`` column) left out, on the images the model never trained on when the checkpoint
records them. With re-ranking the decision is fitted on the re-ranking's calibration pairs,
on the global cosine and on the calibrated fused probability, and the better of the two on
that simulation decides (``metrics.json`` records which: ``open_set.gate``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.decide import (
    GLOBAL_SCORE,
    DecisionConfig,
    auroc,
    balanced_threshold_curve,
    choose_samples,
    draw_preferred,
    fit_decision,
    fit_reranked_decision,
    pairs_from_matrix,
    predict_with_threshold,
)
from reid_ray.decide.plot import plot_decision
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
EMBED_DIR = "embed"
CANDIDATES_DIR = "candidates"
GALLERY_CANDIDATES_DIR = "gallery_candidates"
EVAL_SPLITS = ("query", "gallery", "query_unknown")
KS = (1, 5, 20)
QUERIES_PER_PART = 10_000


def identities_of_ids(ids: np.ndarray, identity_of: dict[str, str | None]) -> np.ndarray:
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
    gate_top: np.ndarray | None = None,
) -> dict[str, Any]:
    """Retrieval metrics of the ``query`` rows and, when there are ``query_unknown`` rows
    and a finite threshold, BAKS/BAUS of all queries. Pure; used for the global ranking
    and for a re-ranked one.

    ``scores``/``cand_ids``: [Q, K] best first (``-inf``/``None`` pads); ``identity_of``
    maps image ids to identities; ``gallery_identities``: identity of every indexed item;
    ``gate_top``: [Q] the scores the threshold applies to (default: the top-1 of
    ``scores``), e.g. the global cosine under a re-ranked order.
    """
    from reid_ray.evaluation.metrics import open_set_metrics, retrieval_metrics

    qids = np.asarray(query_ids, dtype=object)
    true = identities_of_ids(qids, identity_of)
    ranked = identities_of_ids(cand_ids, identity_of)
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
            top_scores = _top_scores(scores) if gate_top is None else gate_top
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


def _top_scores(scores: np.ndarray) -> np.ndarray:
    """[Q] the top-1 of [Q, K] scores (-inf without candidates)."""
    if scores.shape[1]:
        return scores[:, 0].astype(np.float64)
    return np.full(scores.shape[0], -np.inf)


def _top1(query_ids, scores, cand, identity_of, unknown_ids, gate_top=None):
    """Gate score, whether the top-1 is right, and the true identity, split known/unknown."""
    true = identities_of_ids(np.asarray(query_ids, dtype=object), identity_of)
    top_score = _top_scores(scores) if gate_top is None else np.asarray(gate_top, np.float64)
    top_id = (
        identities_of_ids(cand[:, 0], identity_of) if cand.shape[1] else np.full(len(true), None)
    )
    unknown = np.array([q in unknown_ids for q in np.asarray(query_ids).tolist()], dtype=bool)
    right = np.array([t == p for t, p in zip(true.tolist(), top_id.tolist(), strict=True)])
    return top_score, right.astype(bool), true.astype(str), unknown


def _open_set(
    decision, query_ids, scores, cand, identity_of, unknown_ids, plot_path: str, title: str,
    gate_top=None,
) -> dict[str, Any]:  # fmt: skip
    """The decision's record, the observed known-vs-unknown AUROC of the queries (threshold
    free) and the BAKS/BAUS-against-threshold plot (simulated and observed curves)."""
    top_score, right, true, unknown = _top1(
        query_ids, scores, cand, identity_of, unknown_ids, gate_top
    )
    observed = None
    if unknown.any() and (~unknown).any():
        observed = balanced_threshold_curve(
            top_score[~unknown], right[~unknown], true[~unknown], top_score[unknown], true[unknown]
        )
    plot = plot_decision(decision, plot_path, observed=observed, title=title)
    return {
        "auroc_known_unknown": auroc(top_score[~unknown], top_score[unknown]),
        "open_set": decision.to_dict(),
        "open_set_plot": plot,
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
    embed_dir: str | None = None,
    decision=None,
    heldout_ids=None,
    k: int = 100,
    exact_threshold: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    rerank_progress=None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark protocol and write ``OUT/metrics.json``; returns the metrics.

    Args:
        manifest_path: the manifest (CSV/Parquet, local or s3://).
        split_path: a split file (``image_id,split``); None uses the manifest's ``split``.
        model_ref: any model reference (``timm:NAME``, ``hf-hub:ORG/NAME``, checkpoint).
        out: output folder (local or s3://).
        rerank: None (global ranking only), True or a ``RerankConfig``: re-rank the
            candidates with ``reid_ray.rerank.rerank_candidates``, calibrated on the
            gallery's leave-one-out candidates; the top-level metrics are then the
            re-ranked ones, the global ones stay under ``global``.
        image_size: override of the model's input side.
        embed_cfg: an ``EmbedConfig`` (its ``image_size`` is replaced by ``image_size``
            when given).
        embed_dir: where the embeddings are cached (default ``OUT/embed``): calls with the
            same model share one folder, so each image is embedded once.
        decision: a ``DecisionConfig`` (how the known-vs-new threshold is chosen).
        heldout_ids: image ids the model never trained on (default: what the checkpoint
            records); the known-vs-new decision is fitted on those when enough are in the
            gallery.
        k: candidates per query (capped at the gallery size).
        exact_threshold: gallery size up to which search is exact (default: the index's).
        overwrite: replace cached embeddings of another model in the embeddings folder.
        progress: ``progress(done, total)`` during embedding.
        rerank_progress: ``progress(stage, done, total)`` during re-ranking.
    """
    from reid_ray.data import read_manifest
    from reid_ray.data.manifest import Manifest
    from reid_ray.embed import EmbedConfig, read_embeddings
    from reid_ray.embed.pipeline import embed_manifest
    from reid_ray.index import DEFAULT_EXACT_THRESHOLD, build_index, search

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if decision is not None and not isinstance(decision, DecisionConfig):
        raise ConfigError(f"decision must be a DecisionConfig, got {type(decision).__name__}")
    decision_cfg = decision or DecisionConfig()
    rerank_cfg = None
    if rerank:
        from reid_ray.rerank import RerankConfig, load_rerank_config

        rerank_cfg = load_rerank_config() if rerank is True else rerank
        if not isinstance(rerank_cfg, RerankConfig):
            raise ConfigError(f"rerank must be True or a RerankConfig, got {type(rerank).__name__}")
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
    identity_of = selected.identity_of()
    split_of = dict(zip(ids_all, split_col, strict=True))
    session_of = None
    if "date" in selected.table.column_names:
        dates = [None if d is None else str(d) for d in selected.table["date"].to_pylist()]
        session_of = {i: d for i, d in zip(ids_all, dates, strict=True) if d}
    unlabelled = [i for i in ids_all if identity_of.get(i) is None]
    if unlabelled:
        raise ConfigError(
            f"{len(unlabelled)} query/gallery row(s) have no identity (e.g. {unlabelled[0]!r}): "
            "evaluation needs labelled rows"
        )
    rio.makedirs(out)
    rio.remove(rio.join(out, METRICS_FILE))

    # 1. embed (cached, resumable, shared between calls with the same model)
    t = time.perf_counter()
    embed_out = embed_dir or rio.join(out, EMBED_DIR)
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
        raise ConfigError(f"no gallery image could be embedded (see {embed_out}/errors)")
    gallery_ids = emb.ids[g_rows]
    gallery_identities = identities_of_ids(gallery_ids, identity_of)

    # 2. index + search
    t = time.perf_counter()
    index = build_index(
        emb.matrix[g_rows],
        gallery_ids,
        key=emb.key,
        # exact at any size unless asked: approximate search would make the metrics so
        exact_threshold=exact_threshold or max(DEFAULT_EXACT_THRESHOLD, len(g_rows)),
    )
    index_seconds = time.perf_counter() - t
    t = time.perf_counter()
    k_eff = min(k, len(g_rows))
    qu_rows = np.concatenate([q_rows, u_rows])
    query_ids = emb.ids[qu_rows]
    scores, cand = search(index, emb.matrix[qu_rows], k_eff)
    n_candidates = _write_candidates(rio.join(out, CANDIDATES_DIR), query_ids, scores, cand)
    # leave-one-out neighbours of the gallery images the decision samples (at most
    # decision.max_samples, held-out images first): the open-set simulation and the
    # re-ranking calibration
    if heldout_ids is None:
        from reid_ray.models import read_heldout_ids

        heldout_ids = read_heldout_ids(model_ref)
    loo = np.arange(len(g_rows))
    if len(loo) > decision_cfg.max_samples:
        held = np.isin(gallery_ids, list(heldout_ids or ()))
        loo = np.sort(draw_preferred(loo, decision_cfg.max_samples, held, decision_cfg.seed))
    loo_ids_q = gallery_ids[loo]
    k_loo = min(k, len(g_rows) - 1)
    if k_loo >= 1:
        loo_scores, loo_ids = search(
            index, emb.matrix[g_rows[loo]], k_loo, query_ids=loo_ids_q, exclude_self=True
        )
    else:
        loo_scores = np.full((len(loo), 1), -np.inf, dtype=np.float32)
        loo_ids = np.full((len(loo), 1), None, dtype=object)
    _write_candidates(rio.join(out, GALLERY_CANDIDATES_DIR), loo_ids_q, loo_scores, loo_ids)
    search_seconds = time.perf_counter() - t

    # 3. the known-vs-new decision (gallery only) and the metrics
    gallery_list = gallery_ids.tolist()
    samples = choose_samples(
        pairs_from_matrix(loo_ids_q, loo_scores, loo_ids),
        gallery_list,
        identity_of,
        session_of=session_of,
        heldout_ids=heldout_ids,
        cfg=decision_cfg,
    )
    decided = fit_decision(samples, decision_cfg, score=GLOBAL_SCORE)
    unknown_ids = set(emb.ids[u_rows].tolist())

    def scored(s, c, dec, plot_name: str, title: str, gate_top=None) -> dict[str, Any]:
        m = score_ranking(
            query_ids, s, c, identity_of, gallery_identities,
            unknown_ids=unknown_ids, threshold=dec.threshold, gate_top=gate_top,
        )  # fmt: skip
        if unknown_ids:
            m["threshold"] = dec.threshold
            m["decision_score"] = dec.gate
            m.update(_open_set(dec, query_ids, s, c, identity_of, unknown_ids,
                               rio.join(out, plot_name), title, gate_top))  # fmt: skip
        return m

    global_metrics = scored(scores, cand, decided, "open_set.png", f"{model_ref}: global score")
    metrics: dict[str, Any] = dict(global_metrics)
    rerank_info = None
    if rerank_cfg is not None:
        metrics, rerank_info = _rerank(
            out, rerank_cfg, selected, query_ids, k_eff, gallery_list, identity_of,
            session_of, heldout_ids, decision_cfg, scored, rerank_progress, overwrite,
            _top_scores(scores), decided,
        )  # fmt: skip
        metrics["global"] = global_metrics

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
                "heldout_images": None if heldout_ids is None else len(heldout_ids),
            },
            "config": {
                "k": k,
                "embed": cfg.to_dict(),
                "embed_dir": embed_out,
                "rerank": None if rerank_cfg is None else _config_dict(rerank_cfg),
                "decision": _config_dict(decision_cfg),
            },
            "counts": {
                **{f"{s}_rows": counts[s] for s in EVAL_SPLITS},
                **{f"{s}_missing": missing[s] for s in EVAL_SPLITS},
                "gallery_identities": int(len(set(gallery_identities.tolist()))),
                "embed_errors": summary.n_errors,
                "manifest_errors": summary.n_manifest_errors,
                "candidates": n_candidates,
            },
            "index": {"kind": index.kind, "n": len(index), "k": k_eff},
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
            "unknown individuals over query + query_unknown rows, with the threshold of the "
            "known-vs-new decision (open_set: fitted on the gallery alone, never on the "
            "queries); auroc_known_unknown: ROC AUC of the top-1 score, known vs unknown "
            "queries (threshold free).",
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


def _config_dict(cfg) -> dict[str, Any]:
    from reid_ray.config import to_dict

    return to_dict(cfg)


def _rerank(
    out, cfg, manifest, query_ids, k_eff, gallery_ids, identity_of, session_of, heldout_ids,
    decision_cfg, scored, progress, overwrite, global_top, global_decision,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Re-rank the query candidates (calibrated on the gallery's leave-one-out candidates)
    and score them; the known-vs-new decision is refitted on the calibration pairs, and
    the global cosine (``global_top``) or the fused probability decides, whichever the
    simulation prefers."""
    from reid_ray.index.candidates import candidates_to_matrix, read_candidates
    from reid_ray.rerank import rerank_candidates

    t = time.perf_counter()
    if cfg.top_k > k_eff:
        logger.warning(
            "re-ranking top_k %d exceeds the %d candidates searched per query (k, capped at "
            "the gallery size): re-ranking %d", cfg.top_k, k_eff, k_eff,
        )  # fmt: skip
    result = rerank_candidates(
        read_candidates(rio.join(out, CANDIDATES_DIR)),
        manifest,
        cfg,
        rio.join(out, "rerank"),
        calibration_candidates=read_candidates(rio.join(out, GALLERY_CANDIDATES_DIR)),
        calibration_preferred=heldout_ids,
        progress=progress,
        overwrite=overwrite,
    )
    ranked = result.ranked
    table = pa.table(
        {
            "query_id": ranked["query_id"].cast(pa.string()),
            "rank": ranked["rank"].cast(pa.int32()),
            "gallery_id": ranked["gallery_id"].cast(pa.string()),
            "score": ranked["probability"].cast(pa.float64()),
        }
    )
    r_scores, r_ids = candidates_to_matrix(table, query_ids, k_eff)
    calib = result.calibration.to_pandas() if result.calibration is not None else None
    if calib is None or calib.empty:
        raise ConfigError("re-ranking returned no calibration pairs: no known-vs-new decision")
    decided = fit_reranked_decision(
        calib, gallery_ids, identity_of, session_of=session_of, heldout_ids=heldout_ids,
        cfg=decision_cfg, fixed_threshold=cfg.threshold, global_decision=global_decision,
    )  # fmt: skip
    gate_top = global_top if decided.gate == "global" else None
    metrics = scored(r_scores, r_ids, decided, "open_set_rerank.png",
                     f"re-ranked ({cfg.extractor} + {cfg.matcher}), decided by the "
                     f"{decided.gate} score", gate_top)  # fmt: skip
    info = {
        "candidates_reranked": min(cfg.top_k, k_eff),
        "seconds": time.perf_counter() - t,
        "ranking": "fused score; score = calibrated P(same individual)",
        "errors": int(result.errors.num_rows) if result.errors is not None else 0,
        "fusion_weight": float(result.fusion.weight),
        "stats": result.stats,
    }
    return metrics, info
