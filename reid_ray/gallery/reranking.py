"""Local-feature re-ranking inside ``identify``, through ``reid_ray.rerank.rerank_candidates``.

Each night image's candidates (its best gallery image per candidate identity, from the
search) are scored by local features and re-ordered by the calibrated fusion; then
``reid_ray.decide`` decides known vs new on the best global cosine or on the top fused
probability, whichever its simulation on the gallery's calibration queries prefers.

The fusion is fitted once per gallery version and re-ranking settings, and stored with the
version (``G/versions/vNNNN/rerank/<key>.json``): calibration queries are a seeded sample of
gallery images (``calibration_queries`` of the rerank config, from identities with at least
two images; a checkpoint's held-out images, never trained on, drawn first), each searched
against the gallery without itself (a Ray task loads the index, not the driver);
``rerank_candidates`` scores their pairs with the night's and fits. Later nights against
the same version reuse the stored fusion, so a rerun decides the same way.
Local features are cached in the gallery's ``features_cache`` (each image extracted once,
across nights) unless the rerank config names a ``cache_dir``.

The known-vs-new threshold (unless the rerank config sets ``threshold`` on the fused
probability) is fitted by ``reid_ray.decide.fit_reranked_decision`` on the calibration
pairs, as evaluate fits it: each calibration query is a *known* sample (its top candidate
after fusion, right when it has the query's identity) and an *unknown* sample (its own
identity removed), the threshold of best balanced accuracy. Why not 0.5: the probability is
calibrated on gallery pairs, about one "same" in ten, so 0.5 is the pair-level rule under
that prior, not under a night's mix of known and new animals. The calibration pairs'
probabilities are in-sample for the fusion (somewhat optimistic), which is one reason the
global cosine may decide better; 0.5 on the fused probability is the fallback when the
simulation has no sample of one kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.errors import ConfigError
from reid_ray.gallery.store import GalleryVersion, read_table

logger = logging.getLogger(__name__)

STORED_FORMAT = "reid-ray-nightly-rerank/1"
# fields of RerankConfig that change resources, not scores: left out of the stored key
_RESOURCE_FIELDS = (
    "top_k",
    "actors",
    "cpus_per_actor",
    "gpus_per_actor",
    "batch_size",
    "queries_per_batch",
    "cache_dir",
    "device",
    "threshold",
)


@dataclass
class NightRerank:
    """What re-ranking gives ``identify``: ``candidates`` (one row per searched image, same
    order: the candidate lists re-ordered, with ``cand_local_scores``, ``cand_fused_scores``
    and ``cand_probabilities``), the decision ``threshold`` and the score it applies to
    (``gate``: ``global``, the best cosine, or ``fused``, the top probability), the
    ``errors`` (image_id, path, stage, reason) and a ``report`` block."""

    candidates: pa.Table
    threshold: float
    errors: pa.Table
    report: dict[str, Any] = field(default_factory=dict)
    gate: str = "fused"
    fusion: Any = None  # the FusionModel the night was ranked with


def rerank_settings(section) -> Any:
    """The rerank config of the nightly ``rerank`` section (the rerank package's loader)."""
    from reid_ray.rerank.config import load_rerank_config

    return load_rerank_config(section.config)


def require_paths(version: GalleryVersion) -> None:
    """Fail fast when the gallery holds images without a stored path (no local features)."""
    table = read_table(version, ["image_id", "path"])
    missing = [i for i, p in zip(table["image_id"].to_pylist(), table["path"].to_pylist(),
                                 strict=True) if not p]  # fmt: skip
    if missing:
        raise ConfigError(
            f"gallery {version.root} ({version.name}) stores no image path for "
            f"{len(missing)} of {table.num_rows} images (e.g. {missing[:3]}): re-ranking needs "
            "every gallery image's file for local features. Build the gallery from a manifest "
            "with paths, or set rerank.enabled: false"
        )


def stored_key(rcfg, calibration_k: int) -> str:
    """Key of a stored fusion: every setting that changes local scores or the fit."""
    from reid_ray.rerank.features import feature_fingerprint

    settings = {k: v for k, v in rcfg.to_dict().items() if k not in _RESOURCE_FIELDS}
    settings.update(fingerprint=feature_fingerprint(rcfg), calibration_k=int(calibration_k))
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def _calibration_search(
    gallery: str, version: str, n: int, k: int, seed: int, heldout: Collection[str] | None = None
) -> pa.Table:
    """Leave-one-out candidates of a seeded sample of gallery images (runs as a Ray task)."""
    from reid_ray.decide import draw_preferred
    from reid_ray.embed.store import table_to_matrix
    from reid_ray.gallery.store import open_version
    from reid_ray.index import load_index, search

    v = open_version(gallery, version)
    table = read_table(v, ["image_id", "identity", "embedding"])
    ids = np.asarray(table["image_id"].to_pylist(), dtype=object)
    identity = np.asarray(table["identity"].to_pylist(), dtype=object).astype(str)
    _, inverse, counts = np.unique(identity, return_inverse=True, return_counts=True)
    eligible = np.nonzero(counts[inverse] >= 2)[0]
    if len(eligible) > n:
        first = np.isin(ids[eligible], list(heldout or ()))
        eligible = draw_preferred(eligible, n, first, seed)
    if len(eligible) == 0 or len(ids) < 2:
        return pa.table({"query_id": pa.array([], pa.string()),
                         "gallery_id": pa.array([], pa.string()),
                         "score": pa.array([], pa.float64()),
                         "rank": pa.array([], pa.int32())})  # fmt: skip
    matrix = table_to_matrix(table.take(pa.array(eligible, pa.int64())))
    index = load_index(v.index_folder())
    scores, nbr = search(index, matrix, min(k, len(ids) - 1), query_ids=ids[eligible],
                         exclude_self=True)  # fmt: skip
    rows = [
        (qi, gi, float(sc), j + 1)
        for row, qi in enumerate(ids[eligible])
        for j, (gi, sc) in enumerate(zip(nbr[row], scores[row], strict=True))
        if gi is not None and np.isfinite(sc)
    ]
    q, g, s, r = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])
    return pa.table({"query_id": pa.array(q, pa.string()), "gallery_id": pa.array(g, pa.string()),
                     "score": pa.array(s, pa.float64()), "rank": pa.array(r, pa.int32())})  # fmt: skip


def calibration_candidates(
    version: GalleryVersion, n: int, k: int, seed: int, heldout: Collection[str] | None = None
) -> pa.Table:
    """``_calibration_search`` on the cluster: the index is loaded by a worker, and only the
    ``n`` x ``k`` candidate rows come back."""
    import ray

    from reid_ray.runtime import get_result

    task = ray.remote(num_cpus=0.5)(_calibration_search)
    return get_result(task.remote(version.root, version.name, n, k, seed, heldout))


def decision_record(
    calibration: pa.Table,
    gallery_ids,
    identity_of: dict[str, str],
    seed: int,
    heldout_ids=None,
    global_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The known-vs-new decision of a gallery version with re-ranking on
    (``reid_ray.decide.fit_reranked_decision`` on the scored calibration pairs; the
    version's global-only decision ``global_record`` is kept as it is when the global score
    wins), as the JSON record stored beside the fusion; a fit without samples of both kinds
    falls back to 0.5 on the fused probability and says so."""
    from reid_ray.decide import Decision, DecisionConfig, fit_reranked_decision

    decision = fit_reranked_decision(
        calibration.to_pandas(), gallery_ids, identity_of, heldout_ids=heldout_ids,
        cfg=DecisionConfig(seed=seed),
        global_decision=Decision.from_record(global_record) if global_record else None,
    )  # fmt: skip
    out = decision.to_dict()
    if np.isfinite(decision.threshold):
        out["threshold_source"] = f"simulated open set, balanced accuracy, {decision.gate} score"
    else:
        out.update(threshold=0.5, gate="fused")
        out["threshold_source"] = "0.5 on the fused probability: the simulation has no sample"
    return json.loads(json.dumps(out, default=_plain))


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _long_candidates(cands: pa.Table):
    """The search output as one row per (image, candidate) with its identity and rank."""
    import pandas as pd

    rows = {"query_id": [], "gallery_id": [], "identity": [], "score": [], "rank": []}
    for qi, idents, scores, images in zip(
        cands["image_id"].to_pylist(),
        cands["cand_identities"].to_pylist(),
        cands["cand_scores"].to_pylist(),
        cands["cand_images"].to_pylist(),
        strict=True,
    ):
        for j, (ident, sc, gi) in enumerate(zip(idents, scores, images, strict=True)):
            rows["query_id"].append(qi)
            rows["gallery_id"].append(gi)
            rows["identity"].append(ident)
            rows["score"].append(float(sc))
            rows["rank"].append(j + 1)
    return pd.DataFrame(rows)


def _manifest(night: pa.Table, version: GalleryVersion, gallery_ids: set[str]):
    """The images re-ranking reads: the night's (identities withheld: labels are read only
    by the evaluation) and the needed gallery images with their stored paths."""
    import pyarrow.compute as pc

    from reid_ray.data.manifest import Manifest

    cols = ["image_id", "path"] + [c for c in ("bbox", "mask") if c in night.column_names]
    n = night.select(cols).append_column("identity", pa.nulls(night.num_rows, pa.string()))
    g = read_table(version, ["image_id", "path", "identity", "bbox"])
    g = g.filter(pc.is_in(g["image_id"], value_set=pa.array(sorted(gallery_ids), pa.string())))
    return Manifest(pa.concat_tables([n, g], promote_options="default"))


def rerank_night(
    version: GalleryVersion,
    night: pa.Table,
    cands: pa.Table,
    cfg,
    out_dir: str,
    *,
    progress=None,
) -> NightRerank:
    """Re-rank the search output ``cands`` (CANDIDATES_SCHEMA rows of the night's images in
    ``night``) with the local features; ``out_dir`` holds the rerank output."""
    import pandas as pd

    from reid_ray.models import read_heldout_ids
    from reid_ray.rerank import FusionModel, rerank_candidates

    rcfg = rerank_settings(cfg.rerank)
    if rcfg.cache_dir is None:
        cache = version.info.get("features_cache") or rio.join(version.root, "features")
        rcfg = rcfg.replace(cache_dir=cache)
    if rcfg.top_k > cfg.search.candidates:
        logger.warning(
            "re-ranking top_k %d exceeds search.candidates %d (candidate identities per "
            "image): re-ranking %d", rcfg.top_k, cfg.search.candidates, cfg.search.candidates,
        )  # fmt: skip
    long = _long_candidates(cands)
    key = stored_key(rcfg, cfg.calibration.k)
    stored_path = rio.join(version.folder, "rerank", f"{key}.json")
    stored = rio.read_json(stored_path) if rio.exists(stored_path) else None
    calib, fusion = None, None
    heldout = read_heldout_ids(version.info["model"]["ref"])
    if stored is not None:
        fusion = FusionModel.from_dict(stored["fusion"])
    else:
        calib = calibration_candidates(
            version, rcfg.calibration_queries, cfg.calibration.k, rcfg.seed, heldout
        )
    needed = set(long["gallery_id"])
    if calib is not None:
        needed |= set(calib["query_id"].to_pylist()) | set(calib["gallery_id"].to_pylist())
    manifest = _manifest(night, version, needed)
    result = rerank_candidates(
        pa.Table.from_pandas(long[["query_id", "gallery_id", "score", "rank"]],
                             preserve_index=False),
        manifest,
        rcfg,
        out_dir,
        calibration_candidates=calib,
        fusion=fusion,
        calibration_preferred=heldout,
        progress=progress,
    )  # fmt: skip
    if stored is None:
        gallery_ids = read_table(version, ["image_id"])["image_id"].to_pylist()
        decision = decision_record(
            result.calibration, gallery_ids, manifest.identity_of(), rcfg.seed, heldout,
            version.calibration(),
        )  # fmt: skip
        stored = {
            "format": STORED_FORMAT,
            "key": key,
            "gallery_version": version.name,
            "rerank": rcfg.to_dict(),
            "calibration_k": cfg.calibration.k,
            "fusion": result.fusion.to_dict(),
            "decision": decision,
            "calibration_stats": result.stats.get("calibration"),
        }
        rio.write_json_atomic(stored_path, stored)
        source = "fitted now, stored with the gallery version"
    else:
        source = "stored with the gallery version"
    threshold = float(stored["decision"]["threshold"])
    threshold_source = stored["decision"]["threshold_source"]
    gate = stored["decision"].get("gate", "fused")  # versions stored before the choice: fused
    if rcfg.threshold is not None:
        threshold, gate = float(rcfg.threshold), "fused"
        threshold_source = "the rerank config's threshold, on the fused probability"

    ranked = result.ranked.to_pandas().merge(
        long[["query_id", "gallery_id", "identity"]], on=["query_id", "gallery_id"], how="left"
    )
    ranked = ranked.sort_values(["query_id", "rank"])
    local = ranked["local_score"].astype(object).where(ranked["local_score"].notna(), None)
    ranked = ranked.assign(local_score=local)
    lists = ranked.groupby("query_id", sort=False).agg(
        cand_identities=("identity", list),
        cand_scores=("global_score", list),
        cand_images=("gallery_id", list),
        cand_local_scores=("local_score", list),
        cand_fused_scores=("fused_score", list),
        cand_probabilities=("probability", list),
    )
    ids = cands["image_id"].to_pylist()
    lists = lists.reindex(ids)
    empty = pd.isna(lists["cand_images"])
    for column in lists.columns:  # images without candidates keep empty lists
        lists[column] = [[] if e else v for v, e in zip(lists[column], empty, strict=True)]
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "cand_identities": pa.array(lists["cand_identities"].tolist(), pa.list_(pa.string())),
            "cand_scores": pa.array(lists["cand_scores"].tolist(), pa.list_(pa.float32())),
            "cand_images": pa.array(lists["cand_images"].tolist(), pa.list_(pa.string())),
            "cand_local_scores": pa.array(
                lists["cand_local_scores"].tolist(), pa.list_(pa.float64())
            ),
            "cand_fused_scores": pa.array(
                lists["cand_fused_scores"].tolist(), pa.list_(pa.float64())
            ),
            "cand_probabilities": pa.array(
                lists["cand_probabilities"].tolist(), pa.list_(pa.float64())
            ),
        }
    )
    stats = result.stats
    report = {
        "enabled": True,
        "candidates_reranked": min(rcfg.top_k, cfg.search.candidates),
        "extractor": rcfg.extractor,
        "matcher": rcfg.matcher,
        "decision_score": (
            "top-1 calibrated fused probability" if gate == "fused" else "best global cosine"
        ),
        "decision_gate": gate,
        "gate_reason": stored["decision"].get("info", {}).get("gate_reason"),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "fusion": stored_path,
        "fusion_source": source,
        "weight": float(result.fusion.weight),
        "weight_reason": stored["fusion"].get("stats", {}).get("weight_reason"),
        "simulated_decision": {
            k: stored["decision"].get(k)
            for k in ("auroc", "separable", "reliable", "simulated", "n_known", "n_unknown")
        },
        "simulated_gates": stored["decision"].get("info", {}).get("gates"),
        "calibration": stored.get("calibration_stats"),
        "pairs_scored": stats.get("pairs_scored"),
        "pairs_cached": stats.get("pairs_cached"),
        "pairs_without_local": int(sum(v is None for v in local)),
        "errors": int(result.errors.num_rows),
        "feature_cache": rcfg.cache_dir,
        "seconds": stats.get("seconds"),
    }
    logger.info(
        "re-ranked %d images: weight %.2f, threshold %.3f (%s), %d errors",
        len(ids),
        result.fusion.weight,
        threshold,
        threshold_source,
        result.errors.num_rows,
    )
    return NightRerank(table, threshold, result.errors, report, gate, result.fusion)


def group_new_reranked(
    version: GalleryVersion,
    night: pa.Table,
    ids: list[str],
    matrix: np.ndarray,
    cfg,
    reranked: NightRerank,
    out_dir: str,
    night_name: str,
) -> tuple[list[str], dict[str, Any]]:
    """Provisional ids for the night's new images with the night's own decision: each new
    image's ``group.mutual_k`` nearest new images are scored like candidates (local
    features, the stored fusion) and a pair is linked when the decision accepts it (its
    gate score at least the threshold, in either direction). Returns the ids and a report."""
    from reid_ray.gallery.provisional import new_neighbours, provisional_ids
    from reid_ray.rerank import rerank_candidates

    scores, nbr = new_neighbours(ids, matrix, cfg.group.mutual_k)
    rows = [
        (q, g, float(sc), j + 1)
        for q, row_ids, row_scores in zip(ids, nbr, scores, strict=True)
        for j, (g, sc) in enumerate(zip(row_ids, row_scores, strict=True))
        if g is not None and np.isfinite(sc)
    ]
    report = {"pairs": len(rows), "linked": 0, "gate": reranked.gate}
    if not rows:
        return provisional_ids(ids, [], night_name), report
    q, g, sc, r = (list(c) for c in zip(*rows, strict=True))
    pairs = pa.table({"query_id": pa.array(q, pa.string()), "gallery_id": pa.array(g, pa.string()),
                      "score": pa.array(sc, pa.float64()), "rank": pa.array(r, pa.int32())})  # fmt: skip
    rcfg = rerank_settings(cfg.rerank)
    if rcfg.cache_dir is None:
        cache = version.info.get("features_cache") or rio.join(version.root, "features")
        rcfg = rcfg.replace(cache_dir=cache)
    rcfg = rcfg.replace(top_k=max(rcfg.top_k, cfg.group.mutual_k))
    result = rerank_candidates(pairs, _manifest(night, version, set()), rcfg, out_dir,
                               fusion=reranked.fusion)  # fmt: skip
    ranked = result.ranked.to_pandas()
    gated = ranked["probability"] if reranked.gate == "fused" else ranked["global_score"]
    accepted = ranked[gated.to_numpy(np.float64) >= reranked.threshold]
    linked = list(zip(accepted["query_id"], accepted["gallery_id"], strict=True))
    report.update(linked=len(linked), errors=int(result.errors.num_rows))
    return provisional_ids(ids, linked, night_name), report


__all__ = ["NightRerank", "group_new_reranked", "decision_record", "require_paths", "rerank_night"]
