"""The toy zoo's species bodies: silhouettes drawn with OpenCV and their shading.

Pure numpy + OpenCV, no I/O; :mod:`reid_ray.synth.render` paints coats onto these bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

# -- body silhouettes -------------------------------------------------------------------------
# Geometry is written in units of the canvas width u (x in [0, 1], y in [0, 0.5]); the canvas
# is u x u/2 pixels with the head on the left (the animal's left flank).

_SHIFT = 4  # OpenCV sub-pixel drawing: coordinates carry 4 fractional bits
_ONE = 1 << _SHIFT


def _pt(u: int, x: float, y: float) -> tuple[int, int]:
    return int(round(x * u * _ONE)), int(round(y * u * _ONE))


def _ellipse(img, u, c, axes, angle=0.0, color=255, thickness=-1, arc=(0, 360)) -> None:
    ax = (max(1, int(round(axes[0] * u * _ONE))), max(1, int(round(axes[1] * u * _ONE))))
    cv2.ellipse(img, _pt(u, *c), ax, angle, arc[0], arc[1], color, thickness, cv2.LINE_AA, _SHIFT)


def _poly(img, u, pts, color=255) -> None:
    arr = np.array([_pt(u, x, y) for x, y in pts], dtype=np.int32)
    cv2.fillPoly(img, [arr], color, cv2.LINE_AA, _SHIFT)


def _limb(img, u, pts, width, color=255) -> None:
    """A thick polyline with rounded joints (legs, tails)."""
    t = max(1, int(round(width * u)))
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        cv2.line(img, _pt(u, x0, y0), _pt(u, x1, y1), color, t, cv2.LINE_AA, _SHIFT)


def _draw_cat(m, u) -> None:
    _ellipse(m, u, (0.50, 0.225), (0.25, 0.085))
    _ellipse(m, u, (0.31, 0.23), (0.095, 0.085))
    _ellipse(m, u, (0.69, 0.215), (0.10, 0.09))
    _poly(m, u, [(0.20, 0.17), (0.31, 0.15), (0.33, 0.29), (0.21, 0.25)])
    _ellipse(m, u, (0.155, 0.165), (0.062, 0.055))
    _ellipse(m, u, (0.10, 0.185), (0.036, 0.028))
    _poly(m, u, [(0.14, 0.12), (0.16, 0.085), (0.185, 0.125)])
    for top, foot in (
        ((0.29, 0.28), (0.27, 0.465)),
        ((0.36, 0.28), (0.38, 0.465)),
        ((0.66, 0.27), (0.63, 0.465)),
        ((0.73, 0.26), (0.77, 0.465)),
    ):
        _limb(m, u, [top, foot], 0.036)
        _ellipse(m, u, (foot[0] - 0.008, foot[1]), (0.024, 0.012))
    _limb(m, u, [(0.76, 0.18), (0.86, 0.22), (0.93, 0.31), (0.96, 0.40)], 0.022)


def _draw_horse(m, u) -> None:
    _ellipse(m, u, (0.54, 0.245), (0.23, 0.09))
    _ellipse(m, u, (0.36, 0.24), (0.08, 0.085))
    _ellipse(m, u, (0.72, 0.235), (0.085, 0.09))
    _poly(m, u, [(0.25, 0.21), (0.38, 0.17), (0.25, 0.05), (0.16, 0.06)])
    _ellipse(m, u, (0.13, 0.095), (0.085, 0.036), angle=35)
    _poly(m, u, [(0.19, 0.05), (0.205, 0.01), (0.22, 0.055)])
    for top, foot in (
        ((0.34, 0.30), (0.33, 0.485)),
        ((0.41, 0.30), (0.42, 0.485)),
        ((0.68, 0.30), (0.66, 0.485)),
        ((0.75, 0.29), (0.78, 0.485)),
    ):
        _limb(m, u, [top, foot], 0.03)
    _limb(m, u, [(0.77, 0.20), (0.81, 0.28), (0.82, 0.36)], 0.028)


def _draw_seal(m, u) -> None:
    _ellipse(m, u, (0.52, 0.30), (0.36, 0.11))
    _ellipse(m, u, (0.15, 0.245), (0.085, 0.072))
    _ellipse(m, u, (0.09, 0.265), (0.04, 0.03))
    _poly(m, u, [(0.28, 0.35), (0.37, 0.36), (0.26, 0.47)])
    _poly(m, u, [(0.84, 0.30), (0.98, 0.21), (0.95, 0.31), (0.98, 0.40)])


def _draw_fish(m, u) -> None:
    _ellipse(m, u, (0.46, 0.25), (0.36, 0.095))
    _poly(m, u, [(0.77, 0.25), (0.97, 0.07), (0.92, 0.25), (0.97, 0.43)])
    _poly(m, u, [(0.38, 0.17), (0.53, 0.17), (0.50, 0.04)])
    _poly(m, u, [(0.27, 0.30), (0.37, 0.31), (0.25, 0.43)])


_DRAW_BODY: dict[str, Callable] = {
    "cat": _draw_cat,
    "horse": _draw_horse,
    "seal": _draw_seal,
    "fish": _draw_fish,
}


@dataclass(frozen=True)
class _Body:
    """A species' body on the canvas: the silhouette (alpha) and its 3-D-looking shading."""

    alpha: np.ndarray  # (h, w) uint8
    shade: np.ndarray  # (h, w, 1) float32
    reach: np.ndarray  # (h, w) float32: distance to the silhouette in px (0 inside)
    box: tuple[int, int, int, int]  # x, y, w, h of the silhouette on the canvas


def _body(shape: str, u: int) -> _Body:
    """Draw a silhouette once per species; the shading darkens the belly and the outline
    so that the body reads as a rounded animal rather than a flat sticker."""
    alpha = np.zeros((u // 2, u), np.uint8)
    _DRAW_BODY[shape](alpha, u)
    solid = (alpha > 127).astype(np.uint8)
    dist = cv2.distanceTransform(solid, cv2.DIST_L2, 5)
    edge = np.sqrt(np.clip(dist / (0.03 * u), 0.0, 1.0))
    x, y, w, h = cv2.boundingRect(solid)
    rows = (np.arange(u // 2, dtype=np.float32)[:, None] - y) / max(h, 1)
    shade = (0.7 + 0.3 * edge) * (1.1 - 0.3 * np.clip(rows, 0.0, 1.0))
    reach = cv2.distanceTransform(1 - (alpha > 0).astype(np.uint8), cv2.DIST_L2, 5)
    return _Body(alpha, shade.astype(np.float32)[..., None], reach, (x, y, w, h))
