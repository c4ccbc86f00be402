"""Rendering the toy zoo's animals: species bodies, individual coat patterns, one image.

Pure numpy + OpenCV, no I/O: :func:`render_image` draws one photo of one individual from
explicit seeds, so the same arguments give byte-identical pixels. ``zoo.py`` decides what
to render and writes the files (see its docstring for why the zoo is built this way).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from reid_ray.synth.shapes import _ONE, _SHIFT, _Body

JPEG_QUALITY = 90
_FIRST_DATE = _dt.date(2024, 1, 1)
# fixed sub-stream tags, so that each use of a seed has its own independent stream
_TAG_COAT, _TAG_IMAGE, _TAG_NOISE, _TAG_SPECIES, _TAG_DATE = 1, 2, 3, 4, 5


# -- species ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Species:
    """What all individuals of a species share: body, colours and pattern statistics.

    Colours are RGB. ``marks`` is how many marks (spots, rosettes) a whole coat canvas gets,
    or the number of stripes across it; ``mark_size`` is the mark radius (or stripe
    half-width for stripes) as a fraction of the canvas width.
    """

    name: str
    shape: str  # "cat", "horse", "seal" or "fish"
    pattern: str  # "spots", "stripes" or "rosettes"
    coat: tuple[int, int, int]
    ink: tuple[int, int, int]
    marks: int
    mark_size: float


CATALOGUE: tuple[Species, ...] = (
    Species("spotted-cat", "cat", "spots", (214, 170, 98), (38, 26, 18), 260, 0.012),
    Species("striped-horse", "horse", "stripes", (236, 232, 220), (28, 26, 28), 17, 0.5),
    Species("rosette-cat", "cat", "rosettes", (222, 152, 64), (44, 30, 20), 70, 0.030),
    Species("spotted-seal", "seal", "spots", (150, 150, 146), (58, 56, 54), 130, 0.018),
    Species("striped-cat", "cat", "stripes", (226, 124, 44), (22, 16, 12), 21, 0.62),
    Species("spotted-shark", "fish", "spots", (72, 88, 104), (228, 226, 214), 200, 0.012),
)
_SHAPES = ("cat", "horse", "seal", "fish")
_PATTERNS = ("spots", "stripes", "rosettes")


def species_of(index: int) -> Species:
    """The species with this index: the catalogue first, then procedural ones.

    Species do not depend on the seed, so a species looks the same in every zoo.
    """
    if index < len(CATALOGUE):
        return CATALOGUE[index]
    rng = np.random.default_rng([index, _TAG_SPECIES])
    pattern = _PATTERNS[index % len(_PATTERNS)]
    coat = tuple(int(c) for c in rng.integers(60, 240, 3))
    ink = tuple(int(c) for c in (np.asarray(coat) * rng.uniform(0.1, 0.3)).astype(int))
    marks, size = {"spots": (160, 0.017), "stripes": (19, 0.55), "rosettes": (70, 0.03)}[pattern]
    return Species(
        f"{pattern}-species-{index:02d}",
        _SHAPES[int(rng.integers(len(_SHAPES)))],
        pattern,
        coat,
        ink,
        marks,
        size,
    )


# -- coat patterns ----------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, grid: tuple[int, int], hw: tuple[int, int]):
    """Smooth random field: a coarse Gaussian grid upsampled (bicubic) to ``hw``.

    The grid, not the output size, carries the randomness, so a pattern is the same shape at
    every image size.
    """
    low = rng.standard_normal(grid).astype(np.float32)
    return cv2.resize(low, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)


def _fixed_xy(xy: np.ndarray, u: int) -> list[tuple[int, int]]:
    """Canvas units -> OpenCV fixed-point pixel coordinates, for many points at once."""
    return [tuple(p) for p in np.rint(np.asarray(xy) * (u * _ONE)).astype(np.int64).tolist()]


def _fixed_len(v: np.ndarray, u: int) -> list[int]:
    return np.maximum(1, np.rint(np.asarray(v) * (u * _ONE))).astype(np.int64).tolist()


def _visible(body: _Body, centres: np.ndarray, extent: np.ndarray, u: int) -> np.ndarray:
    """Which marks can touch the body: drawing the others (over half the canvas) would
    only cost time, since the silhouette hides them."""
    h, w = body.reach.shape
    px = np.clip((centres[:, 0] * u).astype(int), 0, w - 1)
    py = np.clip((centres[:, 1] * u).astype(int), 0, h - 1)
    return body.reach[py, px] <= extent * u + 2


def _spots(sp: Species, body: _Body, rng: np.random.Generator, u: int) -> np.ndarray:
    """Irregular solid spots: each is two overlapping ellipses of random size and angle."""
    ink = np.zeros((u // 2, u), np.uint8)
    n = sp.marks
    centres = rng.uniform((0.0, 0.0), (1.0, 0.5), (n, 2))
    radii = sp.mark_size * rng.uniform(0.55, 1.45, n)
    shapes = rng.uniform(0.55, 1.0, (n, 2))
    angles = rng.uniform(0, 180, (n, 2)).tolist()
    offsets = rng.normal(0.0, 0.45, (n, 2))
    second = centres + offsets * radii[:, None]
    c1, c2 = _fixed_xy(centres, u), _fixed_xy(second, u)
    a1 = _fixed_len(radii[:, None] * np.stack([np.ones(n), shapes[:, 0]], 1), u)
    a2 = _fixed_len(0.7 * radii[:, None] * np.stack([np.ones(n), shapes[:, 1]], 1), u)
    reach = np.abs(offsets).max(1) * radii + radii
    for i in np.flatnonzero(_visible(body, centres, reach, u)):
        cv2.ellipse(ink, c1[i], a1[i], angles[i][0], 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        cv2.ellipse(ink, c2[i], a2[i], angles[i][1], 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
    return ink.astype(np.float32) / 255.0


def _rosettes(sp: Species, body: _Body, rng: np.random.Generator, u: int) -> np.ndarray:
    """Jaguar-like rosettes: broken rings (3-5 arcs) around a darker centre, some with a
    central dot, plus small solid spots between them."""
    ink = np.zeros((u // 2, u), np.uint8)
    n = sp.marks
    centres = rng.uniform((0.0, 0.0), (1.0, 0.5), (n, 2))
    radii = sp.mark_size * rng.uniform(0.7, 1.3, n)
    flat = rng.uniform(0.65, 1.0, n)
    angles = rng.uniform(0, 180, n).tolist()
    parts = rng.integers(3, 6, n).tolist()
    starts = rng.uniform(0, 360, n)
    spans = rng.uniform(0.5, 0.85, (n, 5))
    thick = np.maximum(1, np.rint(u * radii[:, None] * rng.uniform(0.22, 0.34, (n, 5))))
    thick = thick.astype(int).tolist()
    dots = rng.random(n) < 0.4
    c = _fixed_xy(centres, u)
    axes = _fixed_len(radii[:, None] * np.stack([np.ones(n), flat], 1), u)
    dot_axes = _fixed_len(0.22 * radii, u)
    for i in np.flatnonzero(_visible(body, centres, 1.3 * radii, u)):
        cv2.ellipse(ink, c[i], axes[i], angles[i], 0, 360, 70, -1, cv2.LINE_AA, _SHIFT)
        step = 360.0 / parts[i]
        for p in range(parts[i]):
            a0 = starts[i] + p * step
            cv2.ellipse(
                ink,
                c[i],
                axes[i],
                angles[i],
                a0,
                a0 + step * spans[i, p],
                255,
                thick[i][p],
                cv2.LINE_AA,
                _SHIFT,
            )
        if dots[i]:
            cv2.ellipse(ink, c[i], (dot_axes[i],) * 2, 0, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
    small = rng.uniform((0.0, 0.0), (1.0, 0.5), (n, 2))
    small_r = sp.mark_size * rng.uniform(0.15, 0.3, n)
    small_axes = _fixed_len(small_r[:, None] * np.stack([np.ones(n), rng.uniform(0.6, 1, n)], 1), u)
    small_angles = rng.uniform(0, 180, n).tolist()
    cs = _fixed_xy(small, u)
    for i in np.flatnonzero(_visible(body, small, small_r, u)):
        cv2.ellipse(
            ink, cs[i], small_axes[i], small_angles[i], 0, 360, 255, -1, cv2.LINE_AA, _SHIFT
        )
    return ink.astype(np.float32) / 255.0


def _stripes(sp: Species, body: _Body, rng: np.random.Generator, u: int) -> np.ndarray:
    """Zebra or tiger stripes: level sets of a noisy phase field.

    The phase is ``x * stripes`` bent by smooth noise at two scales (the individual's
    layout: bends, forks and wiggles); a third field varies the stripe width and, for thin
    stripes (``mark_size`` > 0.55), a fourth breaks them into pieces.
    """
    h, w = u // 2, u
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 0.5, h, dtype=np.float32)[:, None]
    tilt = rng.uniform(-0.25, 0.25)
    phase = (x + tilt * y) * sp.marks
    phase = phase + 1.1 * _smooth_noise(rng, (3, 5), (h, w))
    phase = phase + 0.35 * _smooth_noise(rng, (7, 13), (h, w))
    wave = np.sin(2.0 * np.pi * phase)
    level = sp.mark_size - 0.5 + 0.18 * _smooth_noise(rng, (5, 9), (h, w))
    ink = np.clip(0.5 + (wave - level) * 3.0, 0.0, 1.0)
    if sp.mark_size > 0.55:
        breaks = _smooth_noise(rng, (6, 12), (h, w))
        ink *= np.clip(0.5 + (breaks + 0.7) * 3.0, 0.0, 1.0)
    return ink.astype(np.float32)


_PATTERN_FN: dict[str, Callable] = {"spots": _spots, "rosettes": _rosettes, "stripes": _stripes}


def coat_texture(sp: Species, body: _Body, rng: np.random.Generator, u: int) -> np.ndarray:
    """One flank's coat colours as a BGR canvas (head on the left): the species' colours
    and shading, the pattern layout from ``rng`` (the individual's stream)."""
    ink = _PATTERN_FN[sp.pattern](sp, body, rng, u)[..., None]
    coat = np.asarray(sp.coat[::-1], np.float32)
    mark = np.asarray(sp.ink[::-1], np.float32)
    return np.clip((coat + (mark - coat) * ink) * body.shade, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Individual:
    species: int
    index: int
    identity: str
    # per flank (left: head on the left, right: head on the right)
    bgr: tuple[np.ndarray, np.ndarray]  # coat colours, (h, w, 3) uint8
    alpha: tuple[np.ndarray, np.ndarray]  # silhouette, (h, w) uint8
    boxes: tuple[tuple[int, int, int, int], tuple[int, int, int, int]]  # silhouette boxes
    first_day: int


def make_individual(seed: int, species: int, index: int, body: _Body, u: int) -> _Individual:
    """Draw an individual's two flank coats from ``(seed, species, index)`` only, so the
    pattern does not change when a zoo gets more images or more individuals. The right
    flank is its own pattern on the mirrored body (head on the right)."""
    sp = species_of(species)
    left = coat_texture(sp, body, np.random.default_rng([seed, species, index, _TAG_COAT, 0]), u)
    right = coat_texture(sp, body, np.random.default_rng([seed, species, index, _TAG_COAT, 1]), u)
    x, y, w, h = body.box
    first_day = int(np.random.default_rng([seed, species, index, _TAG_DATE]).integers(0, 600))
    return _Individual(
        species,
        index,
        identity_name(species, index),
        bgr=(left, np.ascontiguousarray(right[:, ::-1])),
        alpha=(body.alpha, np.ascontiguousarray(body.alpha[:, ::-1])),
        boxes=(body.box, (u - x - w, y, w, h)),
        first_day=first_day,
    )


def identity_name(species: int, index: int) -> str:
    return f"sp{species}-ind{index:03d}"


# -- one image --------------------------------------------------------------------------------

# habitat base colours (BGR) for the backgrounds: grass, savanna, forest floor, rock, mud
_HABITATS = np.array(
    [(55, 125, 95), (95, 150, 172), (45, 78, 70), (112, 120, 126), (70, 92, 118)], np.float32
)


@dataclass(frozen=True)
class _Scene:
    """Per-size constants shared by every image: coordinate grids and a noise bank."""

    size: int
    xs: np.ndarray  # (size, size) float32 in [-1, 1]
    ys: np.ndarray
    noise: np.ndarray  # (2 size, 2 size, 3) float32 N(0, 1)


def _scene(seed: int, size: int) -> _Scene:
    """Precompute what every image needs; the noise bank replaces per-image Gaussian noise
    (a random crop of it per image), which is the costliest step otherwise."""
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    xs, ys = np.meshgrid(g, g)
    rng = np.random.default_rng([seed, _TAG_NOISE])
    noise = rng.standard_normal((2 * size, 2 * size, 3), dtype=np.float32)
    return _Scene(size, xs, ys, noise)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered habitat: smooth colour field, pebbles and leaves (ellipses), grass and
    twigs (lines), slightly out of focus. Different in every image, so it carries no
    identity."""
    base = _HABITATS[int(rng.integers(len(_HABITATS)))]
    low = _shades(rng, base, (4, 4), 0.25, 8.0)
    bg = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    n_blobs = int(rng.integers(12, 36))
    centres = _fixed_xy(rng.uniform(0, size, (n_blobs, 2)), 1)
    axes = _fixed_len(rng.uniform(0.01, 0.09, (n_blobs, 2)) * size + 1, 1)
    angles = rng.uniform(0, 180, n_blobs).tolist()
    colours = _shades(rng, base, (n_blobs,), 0.3, 12.0).tolist()
    for i in range(n_blobs):
        cv2.ellipse(bg, centres[i], axes[i], angles[i], 0, 360, colours[i], -1, cv2.LINE_AA, _SHIFT)
    n_lines = int(rng.integers(15, 60))
    starts = rng.uniform(0, size, (n_lines, 2))
    upright = rng.random() < 0.6
    theta = rng.normal(-np.pi / 2, 0.35, n_lines) if upright else rng.uniform(0, np.pi, n_lines)
    length = rng.uniform(0.04, 0.22, n_lines) * size
    ends = starts + np.stack([np.cos(theta), np.sin(theta)], 1) * length[:, None]
    widths = rng.integers(1, max(2, size // 90) + 1, n_lines).tolist()
    line_colours = _shades(rng, base, (n_lines,), 0.35, 12.0).tolist()
    p0, p1 = _fixed_xy(starts, 1), _fixed_xy(ends, 1)
    for i in range(n_lines):
        cv2.line(bg, p0[i], p1[i], line_colours[i], widths[i], cv2.LINE_AA, _SHIFT)
    sigma = rng.uniform(0.3, 1.6) * size / 256
    return cv2.GaussianBlur(bg, (0, 0), sigma)


def _shades(
    rng: np.random.Generator, base: np.ndarray, shape: tuple, spread: float, hue: float
) -> np.ndarray:
    """Colours near a habitat colour: mostly lighter or darker, a little off in hue, so a
    background looks like one place rather than confetti."""
    light = 1.0 + spread * rng.standard_normal((*shape, 1))
    return np.clip(base * light + rng.normal(0.0, hue, (*shape, 3)), 0, 255).astype(np.uint8)


def _fixed(p) -> tuple[int, int]:
    return int(p[0] * _ONE), int(p[1] * _ONE)


def _pose(rng: np.random.Generator, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A random homography from the canvas to the image: the body scaled to 45-85 % of the
    image width, rotated up to +-22 degrees, turned (one end foreshortened, as when an
    animal is not quite side-on), corners jittered, placed near the centre."""
    bx, by, bw, bh = box
    src = np.array([(bx, by), (bx + bw, by), (bx + bw, by + bh), (bx, by + bh)], np.float32)
    scale = rng.uniform(0.45, 0.85) * size / bw
    angle = np.deg2rad(rng.uniform(-22, 22))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    local = (src - (bx + bw / 2, by + bh / 2)) * scale
    turn = rng.uniform(0.0, 0.25)
    end = 1 if rng.random() < 0.5 else -1  # which end is farther from the camera
    far = (local[:, 0] * end) > 0
    local[far, 1] *= 1.0 - turn
    local[:, 0] *= 1.0 - 0.5 * turn
    centre = size * (0.5 + rng.uniform(-0.1, 0.1, 2))
    dst = local @ rot.T + centre
    dst += rng.normal(0.0, 0.03 * scale * bw, (4, 2))
    return cv2.getPerspectiveTransform(src, dst.astype(np.float32))


def _occlude(
    img: np.ndarray, rng: np.random.Generator, bbox: tuple[int, int, int, int], size: int
) -> None:
    """Partial occlusion in front of the animal (in place): a bush or rock at one end, or
    grass blades and branches across the body; about 55 % of images get one."""
    if rng.random() >= 0.55:
        return
    x, y, w, h = bbox
    base = _HABITATS[int(rng.integers(len(_HABITATS)))]
    colour = _shades(rng, base, (), 0.25, 8.0).astype(np.float64).tolist()
    if rng.random() < 0.5:  # a bush or rock covering one end
        cx = x + w * (0.05 if rng.random() < 0.5 else 0.95) + rng.normal(0, 0.05 * w)
        cy = y + h * rng.uniform(0.4, 1.0)
        k = int(rng.integers(7, 13))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = min(w, h) * rng.uniform(0.3, 0.55) * rng.uniform(0.7, 1.3, k)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
        cv2.fillPoly(img, [(pts * _ONE).astype(np.int32)], colour, cv2.LINE_AA, _SHIFT)
    else:  # grass blades or branches across the body
        for _ in range(int(rng.integers(2, 6))):
            x0 = x + w * rng.uniform(0.0, 1.0)
            p0 = (x0, y + h * rng.uniform(1.0, 1.2))
            p1 = (x0 + w * rng.normal(0, 0.15), y + h * rng.uniform(-0.1, 0.6))
            width = max(1, int(rng.uniform(0.006, 0.02) * size))
            shade = np.clip(np.asarray(colour) * rng.uniform(0.7, 1.2), 0, 255).tolist()
            cv2.line(img, _fixed(p0), _fixed(p1), shade, width, cv2.LINE_AA, _SHIFT)


def render_image(ind: _Individual, image_index: int, seed: int, scene: _Scene):
    """Render one image of ``ind``; returns (BGR uint8 image, viewpoint, bbox, date).

    Order of effects: background, warped coat, occluder, light (gradient, dapples, tint),
    blur, sensor noise. The random stream is keyed by (seed, species, individual, image).
    """
    size = scene.size
    rng = np.random.default_rng([seed, ind.species, ind.index, _TAG_IMAGE, image_index])
    flank = int(rng.integers(2))
    bg = _background(rng, size)
    h_mat = _pose(rng, ind.boxes[flank], size)
    warp = dict(dsize=(size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    coat = cv2.warpPerspective(ind.bgr[flank], h_mat, **warp)
    alpha = cv2.warpPerspective(ind.alpha[flank], h_mat, **warp)
    bbox = cv2.boundingRect((alpha > 127).astype(np.uint8))
    if bbox[2] == 0 or bbox[3] == 0:  # cannot happen with the pose ranges; guard anyway
        bbox = cv2.boundingRect((alpha > 0).astype(np.uint8))
    a = alpha.astype(np.float32) * np.float32(1.0 / 255.0)
    img = cv2.blendLinear(coat, bg, a, 1.0 - a)
    _occlude(img, rng, bbox, size)
    if rng.random() < 0.7:  # focus and motion blur (before the light: it is smooth anyway)
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.3) * size / 256)

    gain = rng.uniform(0.6, 1.25)
    angle = rng.uniform(0, 2 * np.pi)
    light = scene.xs * np.float32(rng.uniform(0.0, 0.35) * math.cos(angle))
    light += scene.ys * np.float32(rng.uniform(0.0, 0.35) * math.sin(angle))
    light += np.float32(gain)
    if rng.random() < 0.35:  # dappled light through leaves
        light *= 1.0 + 0.2 * _smooth_noise(rng, (4, 4), (size, size))
    tint = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    lit = cv2.multiply(img, cv2.merge([light * t for t in tint]), dtype=cv2.CV_32F)
    oy, ox = rng.integers(0, size, 2)
    lit = cv2.scaleAdd(scene.noise[oy : oy + size, ox : ox + size], rng.uniform(1.0, 7.0), lit)
    out = np.clip(lit, 0, 255, out=lit).astype(np.uint8)
    day = ind.first_day + int(rng.integers(0, 120))
    date = (_FIRST_DATE + _dt.timedelta(days=day)).isoformat()
    viewpoint = ("left", "right")[flank]
    return out, viewpoint, tuple(int(v) for v in bbox), date
