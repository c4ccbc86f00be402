"""Pictures for the review page: an image cropped to its box, and a candidate's match drawing.

The crop keeps a small margin around the box (coats are compared at their edges too) and
is scaled to a fixed height so that query and candidates are seen at one size. The match
drawing is ``reid_ray.rerank.viz`` (the re-ranking's own picture: query | candidate with
the surviving correspondences), recomputed from the run's cached local features.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from reid_ray import io as rio
from reid_ray.errors import ImageError

logger = logging.getLogger(__name__)

MARGIN = 0.05
DEFAULT_HEIGHT = 320
MAX_HEIGHT = 1024


def crop_jpeg(data: bytes, bbox: list[float] | None, height: int = DEFAULT_HEIGHT) -> bytes:
    """JPEG bytes of ``data`` cropped to ``bbox`` (x, y, w, h; None: whole image) plus a
    margin, scaled to ``height`` pixels; ImageError when the bytes are not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"not a readable image: {exc}") from None
    if bbox is not None:
        x, y, w, h = (float(v) for v in bbox)
        mx, my = w * MARGIN, h * MARGIN
        box = (
            max(0, int(x - mx)),
            max(0, int(y - my)),
            min(img.width, int(round(x + w + mx))),
            min(img.height, int(round(y + h + my))),
        )
        if box[2] > box[0] and box[3] > box[1]:
            img = img.crop(box)
    height = max(16, min(int(height), MAX_HEIGHT))
    width = max(1, round(img.width * height / img.height))
    img = img.resize((width, height), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def read_crop(path: str | None, bbox, height: int = DEFAULT_HEIGHT) -> bytes:
    if not path:
        raise ImageError("no image path recorded")
    try:
        data = rio.read_bytes(path)
    except (FileNotFoundError, OSError) as exc:
        raise ImageError(f"cannot read {path}: {exc}") from None
    return crop_jpeg(data, bbox, height)


def match_drawing(state: Any, image_id: str, n: int) -> bytes:
    """JPEG of the re-ranking match drawing between ``image_id`` and its candidate ``n``
    (written once under ``DIR/review_matches/``); ImageError when there is none."""
    import pyarrow as pa

    from reid_ray.data.manifest import BBOX_TYPE, Manifest
    from reid_ray.gallery.config import load_nightly_config
    from reid_ray.gallery.reranking import rerank_settings
    from reid_ray.rerank.viz import render_queries

    r = state.results.get(image_id)
    if r is None or not r.get("reranked"):
        raise ImageError(f"{image_id} was not re-ranked: no match drawing")
    names = r["cand_images"] or []
    if not 1 <= n <= len(names):
        raise ImageError(f"{image_id} has no candidate {n}")
    out_dir = rio.join(state.results_dir, "review_matches", str(n))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(image_id))
    cached = rio.join(out_dir, f"{safe}.jpg")
    if rio.exists(cached):
        return rio.read_bytes(cached)
    cfg = load_nightly_config(state.record.get("config") or {})
    rcfg = rerank_settings(cfg.rerank)
    cache = rcfg.cache_dir or state.version.info.get("features_cache")
    cache = cache or rio.join(state.version.root, "features")
    g = state.gallery_images.get(names[n - 1]) or {}
    manifest = Manifest(
        pa.table(
            {
                "image_id": pa.array([image_id, names[n - 1]], pa.string()),
                "path": pa.array([r["path"], g.get("path")], pa.string()),
                "identity": pa.array([None, g.get("identity")], pa.string()),
                "bbox": pa.array([r.get("bbox"), g.get("bbox")], BBOX_TYPE),
            }
        )
    )

    def at(column: str):
        values = r.get(column) or []
        return values[n - 1] if n - 1 < len(values) else None

    ranked = pa.table(
        {
            "query_id": [image_id],
            "gallery_id": [names[n - 1]],
            "rank": [n],
            "probability": pa.array([at("cand_probabilities")], pa.float64()),
            "global_score": pa.array([at("cand_scores")], pa.float64()),
            "score": pa.array([at("cand_fused_scores")], pa.float64()),
        }
    )
    written = render_queries(ranked, manifest, rcfg, out_dir, cache, [image_id], top_n=1)
    if not written:
        raise ImageError(f"no match drawing for {image_id} / candidate {n} (see the log)")
    return rio.read_bytes(written[0])


__all__ = ["crop_jpeg", "match_drawing", "read_crop"]
