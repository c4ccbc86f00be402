"""``gallery build``: labelled images -> the first version of a gallery.

The images are embedded once (``GALLERY/build/embed``, resumable), then written as the
gallery's first part with their identities, indexed, and calibrated (see ``store.py`` for
the layout; the known-vs-new decision is ``reid_ray.decide``'s, fitted by
:func:`fit_gallery_decision`). Rows without an identity go to
``GALLERY/build/errors`` with their reason, like unreadable images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reid_ray import io as rio
from reid_ray import parts as rparts
from reid_ray.decide import (
    DecisionConfig,
    choose_samples,
    draw_preferred,
    fit_confidence,
    fit_decision,
    pairs_from_matrix,
)
from reid_ray.errors import ConfigError, OutputError
from reid_ray.gallery.config import NightlyConfig
from reid_ray.gallery.store import (
    by_image_id,
    gallery_table,
    is_gallery,
    open_version,
    write_version,
)

logger = logging.getLogger(__name__)


def calibrator(cfg: NightlyConfig, model_ref: str) -> Callable:
    """The ``calibrate`` callable of :func:`~reid_ray.gallery.store.write_version`; a
    checkpoint's held-out images (never trained on) are the simulation's queries."""
    from reid_ray.models import read_heldout_ids

    c = cfg.calibration
    heldout = read_heldout_ids(model_ref)

    def calibrate(ids, identities, matrix, index) -> dict[str, Any]:
        return fit_gallery_decision(
            ids, identities, matrix, index, k=c.k, max_queries=c.max_queries, seed=c.seed,
            heldout_ids=heldout,
        )  # fmt: skip

    return calibrate


def fit_gallery_decision(
    ids: np.ndarray,
    identities: np.ndarray,
    matrix: np.ndarray,
    index,
    *,
    k: int = 50,
    max_queries: int = 5000,
    seed: int = 0,
    heldout_ids=None,
) -> dict[str, Any]:
    """The gallery's known-vs-new decision (``reid_ray.decide``): its leave-identity-out
    simulation on at most ``max_queries`` gallery images, each searched against the rest
    (held-out images, never trained on, drawn first and, when enough, the only samples),
    plus the reviewers' confidence calibrator fitted on the same samples. Returns the
    decision record stored as the version's ``calibration.json``."""
    from reid_ray.index import search

    n = len(ids)
    if n < 3:
        raise ConfigError(f"a gallery needs at least 3 images to calibrate, got {n}")
    sample = np.arange(n)
    if n > max_queries:
        sample = draw_preferred(sample, max_queries, np.isin(ids, list(heldout_ids or ())), seed)
    scores, nbr = search(
        index, matrix[sample], min(k, n - 1), query_ids=ids[sample], exclude_self=True
    )
    cfg = DecisionConfig(seed=seed, max_samples=max(2, max_queries))
    samples = choose_samples(
        pairs_from_matrix(ids[sample], scores, nbr),
        ids.tolist(),
        dict(zip(ids.tolist(), identities.tolist(), strict=True)),
        heldout_ids=heldout_ids,
        cfg=cfg,
    )
    decision = fit_decision(samples, cfg)
    if not np.isfinite(decision.threshold):
        raise ConfigError(
            "cannot calibrate the known-vs-new decision: the gallery needs individuals with "
            f"at least two images and at least two individuals ({decision.message})"
        )
    return {
        **decision.to_dict(),
        "threshold": float(decision.threshold),
        "confidence": fit_confidence(samples, decision).to_dict(),
        "k": int(k),
        "max_queries": int(max_queries),
        "seed": int(seed),
    }


def build_gallery(
    manifest_path: str,
    model_ref: str,
    gallery: str,
    cfg: NightlyConfig | None = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Build version v0001 of a gallery at ``gallery``; returns the build report."""
    from reid_ray.data import read_manifest
    from reid_ray.data.manifest import Manifest, errors_table
    from reid_ray.embed import embed_manifest, read_embeddings, read_errors
    from reid_ray.runtime import init_ray, require_shared_output

    cfg = cfg or NightlyConfig()
    if is_gallery(gallery):
        raise OutputError(
            f"{gallery} already holds a gallery (current version {open_version(gallery).name}): "
            "add images with `reid-ray gallery merge`, or build into another folder"
        )
    t0 = time.perf_counter()
    manifest = read_manifest(manifest_path)
    table = manifest.table
    has_identity = pc.fill_null(pc.is_valid(table["identity"]), False)
    labelled, unlabelled = table.filter(has_identity), table.filter(pc.invert(has_identity))
    unlabelled_errors = errors_table(
        [
            {
                "image_id": r["image_id"],
                "path": r["path"],
                "stage": "gallery build",
                "reason": "no identity: gallery images need one",
            }
            for r in unlabelled.select(["image_id", "path"]).to_pylist()
        ]
    )
    init_ray()
    require_shared_output(gallery)
    work = rio.join(gallery, "build", "embed")
    summary = embed_manifest(
        Manifest(labelled, manifest.errors, list(manifest.warnings), manifest.source),
        model_ref,
        work,
        cfg.embed,
        command="gallery build",
        progress=(lambda d, n: progress("embed", d, n)) if progress else None,
    )
    t_embed = time.perf_counter() - t0
    emb = read_embeddings(work, ids=labelled.column("image_id").to_pylist())
    identity = by_image_id(labelled, "identity")
    paths = by_image_id(labelled, "path")
    boxes = by_image_id(labelled, "bbox")
    ids = emb.ids.tolist()
    rows = gallery_table(
        ids, [identity[i] for i in ids], emb.matrix, emb.key, [paths[i] for i in ids], "", "build",
        bboxes=[boxes.get(i) for i in ids],
    )  # fmt: skip
    model = {
        "ref": model_ref,
        "key": summary.key,
        "fingerprint": summary.fingerprint,
        "description": summary.description,
        "embedding_dim": summary.embedding_dim,
        "embed": {"image_size": cfg.embed.image_size, "flip": cfg.embed.flip},
    }
    t = time.perf_counter()
    version = write_version(
        gallery,
        rows,
        parent=None,
        model=model,
        calibrate=calibrator(cfg, model_ref),
        operation="build",
        extra={"source": manifest.source},
    )
    t_version = time.perf_counter() - t
    errors = pa.concat_tables([read_errors(work), unlabelled_errors])
    errors_dir = rio.join(gallery, "build", "errors")
    for old in rparts.list_parts(errors_dir):
        rio.remove(old)
    rparts.write_part(errors_dir, errors, name="part-errors.parquet")
    report = {
        "gallery": gallery,
        "version": version.name,
        "model": model,
        "counts": {
            "manifest_rows": table.num_rows,
            "manifest_errors": manifest.errors.num_rows,
            "unlabelled": unlabelled.num_rows,
            "images": len(ids),
            "identities": version.info["counts"]["identities"],
            "errors": errors.num_rows,
        },
        "threshold": version.info["threshold"],
        "timings": {
            "embed": t_embed,
            "index_and_calibrate": t_version,
            "total": time.perf_counter() - t0,
        },
    }
    rio.write_json_atomic(rio.join(gallery, "build", "report.json"), report)
    logger.info(
        "gallery %s %s: %d images of %d identities",
        gallery,
        version.name,
        len(ids),
        report["counts"]["identities"],
    )
    return report
