"""``identify``: the nightly job. New images -> known individual or new, against a gallery.

Stages (each timed in the run report): embed only what is new (images already in the
gallery are skipped, and the embed stage resumes after a kill), search the gallery on an
actor pool, optionally re-rank the candidates by local features (``rerank.enabled``, see
``reranking.py``), decide known vs new with ``reid_ray.decide`` (the gallery's threshold on
the top cosine or, when re-ranked, on whichever of the best cosine and the top fused
probability the gallery's simulation chose), group the new images into provisional
individuals, write the outputs::

    OUT/embed/                  the embed output (embeddings/, errors/, manifest.json)
    OUT/rerank/                 the re-ranking output (scores/, fusion.json), when enabled
    OUT/results/part-*.parquet  one row per identified image (RESULTS_SCHEMA)
    OUT/review.csv              for reviewers (``reid-ray review``, or by hand): the
                                contract is ``reid_ray/review/sheet.py``
    OUT/errors/part-*.parquet   image_id, path, stage, reason
    OUT/report.json             counts, errors by reason, timings per stage, accuracy
                                (when the manifest carries identities)
    OUT/manifest.json           the run record, written last

Every output but the embeddings is recomputed from them on a rerun (it is cheap), so a
killed run rerun loses and duplicates nothing. Tests crash a run on purpose with
``REID_RAY_IDENTIFY_FAIL_AT`` = ``after-embed`` or ``after-results``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray import parts as rparts
from reid_ray.data.manifest import BBOX_TYPE
from reid_ray.decide import KNOWN, NEW, confidence_from_record, known_or_new
from reid_ray.errors import ConfigError, OutputError
from reid_ray.gallery.config import NightlyConfig
from reid_ray.gallery.provisional import evaluate_decisions, group_new
from reid_ray.gallery.store import (
    GalleryVersion,
    by_image_id,
    fail_point,
    open_version,
    read_table,
)
from reid_ray.review.sheet import write_review_sheet

logger = logging.getLogger(__name__)

RESULTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("decision", pa.string()),  # known | new
        ("identity", pa.string()),  # the known individual, or the provisional new id
        ("confidence", pa.float64()),  # P(same individual) of the top candidate
        ("top_score", pa.float32()),
        ("cand_identities", pa.list_(pa.string())),
        ("cand_scores", pa.list_(pa.float32())),
        ("cand_probabilities", pa.list_(pa.float64())),
        ("cand_images", pa.list_(pa.string())),
        ("night", pa.string()),
        ("gallery_version", pa.string()),
        # re-ranking (null when not re-ranked): candidates then follow the fused order, and
        # confidence / cand_probabilities are the fused calibrated probabilities
        ("reranked", pa.bool_()),
        ("cand_local_scores", pa.list_(pa.float64())),  # null where an image failed
        ("cand_fused_scores", pa.list_(pa.float64())),
        ("bbox", BBOX_TYPE),  # the night row's box (null: whole image)
    ]
)
FAIL_ENV = "REID_RAY_IDENTIFY_FAIL_AT"


def check_model(version: GalleryVersion, model_ref: str | None, image_size, flip) -> None:
    """Refuse a model other than the gallery's (its vectors live in another space)."""
    if not model_ref or model_ref == version.model_ref:
        return
    from reid_ray.embed.embedder import embedding_key
    from reid_ray.models import load

    loaded = load(model_ref, image_size=image_size)
    key = embedding_key(loaded.fingerprint, flip)
    if key != version.key:
        raise ConfigError(
            f"gallery {version.root} ({version.name}) was built with model "
            f"{version.model_ref!r} (embedding key {version.key}); model {model_ref!r} has key "
            f"{key}. Its vectors cannot be compared: identify with the gallery's model, or "
            "build a new gallery with `reid-ray gallery build --model ...`."
        )


def _embed_config(version: GalleryVersion, cfg: NightlyConfig):
    """The night's embedding resources with the gallery's image size and flip (they are
    part of the embedding key)."""
    from reid_ray.config import from_dict, to_dict

    settings = to_dict(cfg.embed)
    embed = version.info["model"].get("embed", {})
    settings.update(image_size=embed.get("image_size"), flip=bool(embed.get("flip", False)))
    return from_dict(type(cfg.embed), settings)


def _errors(
    manifest_errors: pa.Table, embed_dir: str, gallery_dup: list[dict], *more: pa.Table
) -> pa.Table:
    from reid_ray.data.manifest import errors_table
    from reid_ray.embed import read_errors

    tables = [manifest_errors.cast(errors_table([]).schema)]
    if rio.exists(rio.join(embed_dir, "errors")):
        tables.append(read_errors(embed_dir).cast(errors_table([]).schema))
    tables.append(errors_table(gallery_dup))
    tables.extend(t.cast(errors_table([]).schema) for t in more)
    table = pa.concat_tables(tables)
    # the embed output also records the manifest's rejects: keep one row per image and reason
    seen, keep = set(), []
    for i, key in enumerate(
        zip(table["image_id"].to_pylist(), table["reason"].to_pylist(), strict=True)
    ):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return table.take(pa.array(keep, pa.int64()))


def identify(
    gallery: str,
    manifest_path: str,
    out: str,
    cfg: NightlyConfig | None = None,
    *,
    model_ref: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Identify every image of the manifest against the gallery's current version.

    Returns the run report (also ``OUT/report.json``). ``model_ref`` other than the
    gallery's is refused. Bad images go to ``OUT/errors`` with their reason.
    """
    from reid_ray.data import read_manifest
    from reid_ray.data.manifest import Manifest
    from reid_ray.embed import embed_manifest, read_embeddings
    from reid_ray.gallery.searcher import search_parts
    from reid_ray.runtime import init_ray, require_shared_output

    cfg = cfg or NightlyConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    version = open_version(gallery)
    embed_cfg = _embed_config(version, cfg)
    check_model(version, model_ref, embed_cfg.image_size, embed_cfg.flip)
    if cfg.rerank.enabled:  # a bad rerank config or a gallery without paths: before any work
        from reid_ray.gallery.reranking import require_paths, rerank_settings

        rerank_settings(cfg.rerank)
        require_paths(version)
    calibration = version.calibration()
    threshold = float(calibration["threshold"])
    manifest = read_manifest(manifest_path)
    night = cfg.night or out.rstrip("/").rsplit("/", 1)[-1]
    gallery_ids = set(read_table(version, ["image_id"]).column("image_id").to_pylist())
    timings["load_gallery"] = time.perf_counter() - t0

    rio.makedirs(out)
    rio.remove(rio.join(out, rparts.MANIFEST_FILE))  # incomplete until written again
    table = manifest.table
    in_gallery = [i for i in table.column("image_id").to_pylist() if i in gallery_ids]
    if in_gallery:
        import pyarrow.compute as pc

        mask = pc.invert(pc.is_in(table["image_id"], value_set=pa.array(in_gallery, pa.string())))
        table = table.filter(mask)
    dup_rows = [
        {
            "image_id": i,
            "path": None,
            "stage": "identify",
            "reason": f"already in gallery {version.name}: not identified again",
        }
        for i in in_gallery
    ]

    t = time.perf_counter()
    embed_dir = rio.join(out, "embed")
    init_ray()
    require_shared_output(out)
    summary = embed_manifest(
        Manifest(table, manifest.errors, list(manifest.warnings), manifest.source),
        version.model_ref,
        embed_dir,
        embed_cfg,
        command="identify",
        progress=(lambda d, n: progress("embed", d, n)) if progress else None,
    )
    if summary.key != version.key:
        raise ConfigError(
            f"the images were embedded with key {summary.key} but gallery {gallery} holds "
            f"{version.key}: model {version.model_ref!r} changed since the gallery was built; "
            "rebuild the gallery"
        )
    timings["embed"] = time.perf_counter() - t
    fail_point("after-embed", FAIL_ENV)

    t = time.perf_counter()
    cands = search_parts(
        embed_dir,
        gallery,
        version.name,
        k=cfg.search.k,
        candidates=cfg.search.candidates,
        actors=cfg.search.actors,
        batch_size=cfg.search.batch_size,
    )
    wanted = set(table.column("image_id").to_pylist())
    keep = [i in wanted for i in cands["image_id"].to_pylist()]
    cands = cands.filter(pa.array(keep, pa.bool_()))
    timings["search"] = time.perf_counter() - t

    reranked = None
    if cfg.rerank.enabled and cands.num_rows:
        from reid_ray.gallery.reranking import rerank_night

        t = time.perf_counter()
        reranked = rerank_night(version, table, cands, cfg, rio.join(out, "rerank"),
                                progress=progress)  # fmt: skip
        cands = reranked.candidates
        timings["rerank"] = time.perf_counter() - t

    t = time.perf_counter()
    ids = cands.column("image_id").to_pylist()
    cand_ids = cands.column("cand_identities").to_pylist()
    cand_scores = cands.column("cand_scores").to_pylist()
    # the best global cosine (re-ranking may have moved it from the first place)
    top = np.array([max(s) if s else np.nan for s in cand_scores], dtype=np.float64)
    if reranked is not None:
        probs = cands.column("cand_probabilities").to_pylist()
        top_prob = np.array([p[0] if p else np.nan for p in probs], dtype=np.float64)
        gated = top_prob if reranked.gate == "fused" else top
        decisions = known_or_new(gated, reranked.threshold)
    else:
        confidence = confidence_from_record(calibration)
        probs = [confidence.predict(np.asarray(s, dtype=np.float64)).tolist() for s in cand_scores]
        decisions = known_or_new(top, threshold)
    predicted = [
        c[0] if c and d == KNOWN else None for c, d in zip(cand_ids, decisions, strict=True)
    ]
    timings["decide"] = time.perf_counter() - t

    t = time.perf_counter()
    new_idx = [i for i, d in enumerate(decisions) if d == NEW]
    groups: list[str | None] = [None] * len(ids)
    grouping: dict[str, Any] = {}
    if new_idx:
        emb = read_embeddings(embed_dir, ids=[ids[i] for i in new_idx])
        pos = {g: j for j, g in enumerate(emb.ids.tolist())}
        order = [pos[ids[i]] for i in new_idx]
        new_ids = [ids[i] for i in new_idx]
        if reranked is not None and cfg.group.threshold is None:
            from reid_ray.gallery.reranking import group_new_reranked

            labels, grouping = group_new_reranked(
                version, table, new_ids, emb.matrix[order], cfg, reranked,
                rio.join(out, "rerank_new"), night,
            )  # fmt: skip
        else:
            labels = group_new(
                new_ids,
                emb.matrix[order],
                cfg.group.threshold if cfg.group.threshold is not None else threshold,
                cfg.group.mutual_k,
                night,
            )
            grouping = {"gate": "global", "threshold": cfg.group.threshold or threshold}
        for i, label in zip(new_idx, labels, strict=True):
            groups[i] = predicted[i] = label
    timings["group"] = time.perf_counter() - t

    t = time.perf_counter()
    paths = by_image_id(table, "path")
    boxes = by_image_id(table, "bbox")
    n = len(ids)
    no_lists = pa.nulls(n, pa.list_(pa.float64()))
    results = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "path": pa.array([paths.get(i) for i in ids], pa.string()),
            "decision": pa.array(decisions.tolist(), pa.string()),
            "identity": pa.array(predicted, pa.string()),
            "confidence": pa.array([p[0] if p else None for p in probs], pa.float64()),
            "top_score": pa.array(top, pa.float32()),
            "cand_identities": cands["cand_identities"],
            "cand_scores": cands["cand_scores"],
            "cand_probabilities": pa.array(probs, pa.list_(pa.float64())),
            "cand_images": cands["cand_images"],
            "night": pa.array([night] * len(ids), pa.string()),
            "gallery_version": pa.array([version.name] * len(ids), pa.string()),
            "reranked": pa.array([reranked is not None] * n, pa.bool_()),
            "cand_local_scores": cands["cand_local_scores"] if reranked else no_lists,
            "cand_fused_scores": cands["cand_fused_scores"] if reranked else no_lists,
            "bbox": pa.array([boxes.get(i) for i in ids], BBOX_TYPE),
        },
        schema=RESULTS_SCHEMA,
    )
    results = results.sort_by("image_id")
    results_dir = rio.join(out, "results")
    for old in rparts.list_parts(results_dir):
        rio.remove(old)
    rparts.remove_temporary(results_dir)
    rparts.write_part(results_dir, results, name="part-results.parquet")
    rerank_errors = [reranked.errors] if reranked is not None else []
    errors = _errors(manifest.errors, embed_dir, dup_rows, *rerank_errors)
    errors_dir = rio.join(out, "errors")
    for old in rparts.list_parts(errors_dir):
        rio.remove(old)
    rparts.write_part(errors_dir, errors, name="part-errors.parquet")
    write_review_sheet(out, results, errors, version)
    fail_point("after-results", FAIL_ENV)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    n_known = int(sum(d == KNOWN for d in decisions))
    counts = {
        "manifest_rows": manifest.table.num_rows,
        "manifest_errors": manifest.errors.num_rows,
        "already_in_gallery": len(in_gallery),
        "embedded_now": summary.n_embedded,
        "embedded_before": summary.n_already_embedded,
        "embed_errors": summary.n_errors,
        "identified": len(ids),
        "known": n_known,
        "new": len(ids) - n_known,
        "new_individuals": len({g for g in groups if g}),
        "rerank_errors": reranked.errors.num_rows if reranked is not None else 0,
        "errors": errors.num_rows,
    }
    missing = wanted - set(ids) - set(errors["image_id"].to_pylist())
    if missing:
        raise OutputError(
            f"{len(missing)} image(s) neither identified nor in errors: {sorted(missing)[:5]}"
        )
    report = {
        "gallery": gallery,
        "gallery_version": version.name,
        "night": night,
        "threshold": threshold,
        "decision": {
            "score": reranked.report["decision_score"] if reranked else "top-1 cosine",
            "gate": reranked.gate if reranked else "global",
            "threshold": reranked.threshold if reranked else threshold,
        },
        "counts": counts,
        "grouping": grouping,
        "errors_by_reason": dict(Counter(_reason_kind(r) for r in errors["reason"].to_pylist())),
        "error_examples": errors.slice(0, 20).to_pylist(),
        "timings": timings,
        "timings_measure": "wall seconds of each stage of this run on this cluster",
    }
    if cfg.rerank.enabled:
        report["rerank"] = reranked.report if reranked else {"enabled": True, "images": 0}
    if "identity" in manifest.table.column_names:
        truth = dict(
            zip(
                manifest.table["image_id"].to_pylist(),
                manifest.table["identity"].to_pylist(),
                strict=True,
            )
        )
        gallery_identities = set(read_table(version, ["identity"])["identity"].to_pylist())
        report["evaluation"] = evaluate_decisions(
            [truth.get(i) for i in ids], gallery_identities, decisions.tolist(), predicted, groups
        )
    rio.write_json_atomic(rio.join(out, "report.json"), report)
    rparts.write_run_record(
        out,
        "identify",
        config=cfg,
        counts=counts,
        timings=timings,
        gallery=gallery,
        gallery_version=version.name,
        model=version.info["model"],
        night=night,
        source=manifest.source,
        embed=embed_dir,
    )
    logger.info(
        "identify: %d known, %d new (%d individuals), %d errors",
        n_known,
        counts["new"],
        counts["new_individuals"],
        counts["errors"],
    )
    return report


def _reason_kind(reason: str | None) -> str:
    """A reason without its particulars (paths, numbers), for counting."""
    text = str(reason or "unknown")
    return text.split(":", 1)[0][:80]
