"""What a person looks at to answer "same animal?": the two animals cropped to their boxes
and shown large enough to compare coats, or a whole frame with the box outlined.

On a 3000 x 2000 camera-trap frame an animal is a small part of the picture: a thumbnail
of the whole frame shows it at a few dozen pixels. The crop (the box the model trains on,
plus a small margin for context) is scaled so its long side is ``side`` pixels, small crops
included (up to ``MAX_UPSCALE`` times), so the pair is compared at the same size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

CROP_SIDE = 384  # px per animal on the page's pair view (two side by side fit a laptop screen)
ZOOM_SIDE = 1024  # px of one animal in the zoomed view
FRAME_SIDE = 1600  # px of the long side of a whole frame
CROP_MARGIN = 0.08  # share of the box added on each side for context
MAX_UPSCALE = 4.0


def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def crop_to_box(img: np.ndarray, bbox: Sequence[float] | None, margin: float = CROP_MARGIN):
    """The box ``x, y, w, h`` widened by ``margin`` of its size on each side (clipped to
    the image); the whole image when there is no box."""
    from reid_ray.data.images import crop_bbox

    if bbox is None:
        return img
    x, y, w, h = (float(v) for v in bbox)
    return crop_bbox(
        img, [x - margin * w, y - margin * h, w * (1 + 2 * margin), h * (1 + 2 * margin)]
    )


def scale_to(img: np.ndarray, side: int, max_upscale: float = MAX_UPSCALE) -> np.ndarray:
    """``img`` with its long side at ``side`` px (enlarged at most ``max_upscale`` times)."""
    from reid_ray.data import resize_image

    h, w = img.shape[:2]
    scale = min(side / max(h, w), max_upscale)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize_image(img, size)


def _square(img: np.ndarray, side: int) -> np.ndarray:
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    h, w = img.shape[:2]
    y, x = (side - h) // 2, (side - w) // 2
    canvas[y : y + h, x : x + w] = img
    return canvas


def animal_view(path: str, bbox: Sequence[float] | None, side: int = CROP_SIDE) -> np.ndarray:
    """One animal: its box cropped (with margin) and scaled to ``side`` on the long side."""
    from reid_ray.data import load_image

    return scale_to(crop_to_box(load_image(path), bbox), side)


def side_by_side(
    path_a: str,
    path_b: str,
    side: int = CROP_SIDE,
    bbox_a: Sequence[float] | None = None,
    bbox_b: Sequence[float] | None = None,
) -> bytes:
    """A JPEG of both animals (cropped to their boxes) in two ``side`` squares, a gap
    between them."""
    gap = np.full((side, 8, 3), 255, dtype=np.uint8)
    a = _square(animal_view(path_a, bbox_a, side), side)
    b = _square(animal_view(path_b, bbox_b, side), side)
    return _jpeg(np.concatenate([a, gap, b], axis=1))


def animal_jpeg(path: str, bbox: Sequence[float] | None, side: int = ZOOM_SIDE) -> bytes:
    """One animal cropped to its box at ``side`` px (the page's zoom)."""
    return _jpeg(animal_view(path, bbox, side))


def frame_jpeg(path: str, bbox: Sequence[float] | None, side: int = FRAME_SIDE) -> bytes:
    """The whole frame (long side at most ``side``) with the box outlined in red."""
    from reid_ray.data import load_image

    img = load_image(path)
    h, w = img.shape[:2]
    scale = min(1.0, side / max(h, w))
    small = scale_to(img, max(1, round(max(h, w) * scale)), max_upscale=1.0).copy()
    if bbox is not None:
        x, y, bw, bh = (float(v) * scale for v in bbox)
        t = max(2, round(max(small.shape[:2]) / 300))
        x0, y0 = max(0, int(x)), max(0, int(y))
        x1, y1 = min(small.shape[1] - 1, int(x + bw)), min(small.shape[0] - 1, int(y + bh))
        red = np.array([230, 20, 20], dtype=np.uint8)
        small[y0 : y0 + t, x0:x1] = red
        small[max(y0, y1 - t) : y1, x0:x1] = red
        small[y0:y1, x0 : x0 + t] = red
        small[y0:y1, max(x0, x1 - t) : x1] = red
    return _jpeg(small)


__all__ = [
    "CROP_SIDE",
    "animal_jpeg",
    "animal_view",
    "crop_to_box",
    "frame_jpeg",
    "scale_to",
    "side_by_side",
]
