"""One picture per query: the query beside each of its top matches, correspondences drawn.

Each row of the picture is ``query | candidate`` with the surviving matches as lines, a
frame that is green for a correct match (same identity), red for a wrong one and grey when
the identity is unknown, and a caption with the rank, identity, calibrated probability,
local score and global cosine. The matches are recomputed for the few pairs drawn, from the
cached features, with the matcher of the run.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.errors import ImageError
from reid_ray.rerank.config import RerankConfig

logger = logging.getLogger(__name__)

GREEN, RED, GREY = (40, 170, 40), (210, 40, 40), (140, 140, 140)
PANEL_H = 240
MAX_LINES = 60


def _fit_height(img: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    import cv2

    s = height / img.shape[0]
    return cv2.resize(img, (max(1, round(img.shape[1] * s)), height)), s


def _pair_panel(q_img, c_img, q_kp, c_kp, result, color, caption: str) -> np.ndarray:
    import cv2

    qa, qs = _fit_height(q_img, PANEL_H)
    ca, cs = _fit_height(c_img, PANEL_H)
    gap = 8
    canvas = np.full((PANEL_H + 34, qa.shape[1] + gap + ca.shape[1], 3), 255, np.uint8)
    canvas[30 : 30 + PANEL_H, : qa.shape[1]] = qa
    canvas[30 : 30 + PANEL_H, qa.shape[1] + gap :] = ca
    if result is not None and len(result.matches):
        keep = np.nonzero(result.inliers)[0]
        if len(keep) > MAX_LINES:
            keep = keep[np.argsort(-result.confidence[keep])[:MAX_LINES]]
        for k in keep:
            i, j = result.matches[k]
            p0 = (int(q_kp[i, 0] * qs), int(q_kp[i, 1] * qs + 30))
            p1 = (int(c_kp[j, 0] * cs + qa.shape[1] + gap), int(c_kp[j, 1] * cs + 30))
            cv2.line(canvas, p0, p1, (255, 200, 0), 1, cv2.LINE_AA)
            cv2.circle(canvas, p0, 2, (255, 120, 0), -1)
            cv2.circle(canvas, p1, 2, (255, 120, 0), -1)
    x0 = qa.shape[1] + gap
    cv2.rectangle(canvas, (x0, 29), (canvas.shape[1] - 1, 30 + PANEL_H), color, 3)
    cv2.putText(
        canvas, caption, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (20, 20, 20), 1, cv2.LINE_AA
    )
    return canvas


def render_queries(
    reranked: pa.Table,
    manifest: Any,
    cfg: RerankConfig,
    out_dir: str,
    cache_root: str,
    query_ids: list[str] | None = None,
    max_queries: int = 10,
    top_n: int = 3,
) -> list[str]:
    """Write ``<out_dir>/<query_id>.jpg`` for up to ``max_queries`` queries; returns paths.

    ``reranked`` is ``RerankResult.ranked`` (or candidates with ``rank`` and ``score``); features come
    from ``cache_root`` (extracted here when missing). Unusable images are skipped with a
    log line, never an exception.
    """
    import cv2

    from reid_ray.rerank.cache import FeatureCache
    from reid_ray.rerank.features import (
        build_extractor,
        feature_fingerprint,
        load_prepared,
    )
    from reid_ray.rerank.matchers import PairScorer
    from reid_ray.rerank.scoring import as_manifest

    manifest = as_manifest(manifest)
    df = reranked.to_pandas()
    rank_col = "rank"
    df = df.sort_values(["query_id", rank_col])
    queries = query_ids or list(dict.fromkeys(df["query_id"]))[:max_queries]
    rows = {r["image_id"]: r for r in manifest.table.to_pylist()}
    cache = FeatureCache(cache_root, feature_fingerprint(cfg))
    scorer = PairScorer(cfg, "cpu")
    extractor = None
    written = []

    def features(image_id: str):
        nonlocal extractor
        feats = cache.get(image_id)
        img, mask, scale = load_prepared(rows[image_id], cfg)
        if feats is None:
            extractor = extractor or build_extractor(cfg, "cpu")
            feats = extractor.extract(img, mask, scale)
            cache.put(image_id, feats)
        return img, feats

    for q in queries:
        if q not in rows:
            logger.warning("viz: query %s is not in the manifest", q)
            continue
        try:
            q_img, q_feats = features(q)
        except ImageError as exc:
            logger.warning("viz: query %s skipped: %s", q, exc)
            continue
        q_ident = rows[q].get("identity")
        panels = []
        for r in df[df["query_id"] == q].head(top_n).to_dict("records"):
            g = str(r["gallery_id"])
            if g not in rows:
                continue
            try:
                g_img, g_feats = features(g)
            except ImageError as exc:
                logger.warning("viz: candidate %s skipped: %s", g, exc)
                continue
            result = scorer.match(q_feats, [g_feats])[0]
            g_ident = rows[g].get("identity")
            if q_ident is None or g_ident is None:
                color, verdict = GREY, "?"
            elif q_ident == g_ident:
                color, verdict = GREEN, "correct"
            else:
                color, verdict = RED, "wrong"
            prob = r.get("probability")
            glob = float(r.get("global_score", r.get("score")))
            caption = (
                f"#{int(r[rank_col])} {g} [{g_ident}] {verdict}  "
                + (f"p={prob:.2f} " if prob is not None and np.isfinite(prob) else "")
                + f"local={result.score(scorer.score_kind):.1f} global={glob:.3f}"
            )
            panels.append(
                _pair_panel(
                    q_img, g_img, q_feats.keypoints, g_feats.keypoints, result, color, caption
                )
            )
        if not panels:
            continue
        width = max(p.shape[1] for p in panels)
        header = np.full((28, width, 3), 255, np.uint8)
        cv2.putText(
            header,
            f"query {q} [{q_ident}]",
            (4, 20),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.6,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        padded = [
            np.pad(p, ((0, 6), (0, width - p.shape[1]), (0, 0)), constant_values=255)
            for p in panels
        ]
        picture = np.concatenate([header, *padded], axis=0)
        ok, buf = cv2.imencode(".jpg", picture[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            continue
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(q))
        path = rio.join(out_dir, f"{safe}.jpg")
        rio.write_bytes_atomic(path, buf.tobytes())
        written.append(path)
    return written
