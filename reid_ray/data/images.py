"""Image decoding for re-identification: by content, EXIF-aware, bbox crop, resize.

Decoding never trusts the file extension (a PNG named ``.jpg`` loads). Every failure is an
``ImageError`` whose message is the reason recorded in the errors table.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np

from reid_ray.errors import ImageError

#: Images above this many pixels are refused (decompression-bomb guard, ~ 16k x 16k).
MAX_PIXELS = 256_000_000


def decode_image(
    data: bytes,
    bbox: Sequence[float] | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
    target: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array, EXIF rotation applied, bbox cropped.

    ``target`` (h, w): the size the caller resizes to next. A JPEG much larger than that
    is decoded at a reduced scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling via PIL
    ``draft``) that still leaves the image, or the bbox crop, at least ``target``: the
    same picture after the resize, at a fraction of the decode time. The bbox is given
    in full-resolution pixels either way.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError("empty file (0 bytes)")
    scale = 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image too large ({w}x{h} px > {max_pixels} px): refused")
            if target is not None and img.format == "JPEG":
                scale = _draft(img, target, bbox)
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised content)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt image: {exc}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a bad EXIF block must not lose the image
        pass
    arr = _to_rgb_uint8(img)
    if bbox is not None:
        arr = crop_bbox(arr, [v * scale for v in bbox] if scale != 1.0 else bbox)
    return arr


def _draft(img, target: tuple[int, int], bbox: Sequence[float] | None) -> float:
    """Ask libjpeg for the smallest DCT scale keeping the (cropped) image >= ``target``;
    returns the scale applied (1.0: none)."""
    w, h = img.size
    th, tw = int(target[0]), int(target[1])
    orientation = img.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):  # rotated 90 degrees: the target's axes swap
        th, tw = tw, th
    if bbox is not None:
        try:
            bw, bh = float(bbox[2]), float(bbox[3])
            if orientation in (5, 6, 7, 8):
                bw, bh = bh, bw
        except (TypeError, ValueError, IndexError):
            return 1.0
        if not (np.isfinite(bw) and np.isfinite(bh)) or bw <= 0 or bh <= 0:
            return 1.0  # crop_bbox reports the bad box
        need_w, need_h = w * tw / min(bw, w), h * th / min(bh, h)
    else:
        need_w, need_h = tw, th
    if w < 2 * need_w or h < 2 * need_h:
        return 1.0  # not even a halving: decode at full size
    mode = "RGB" if img.mode in ("RGB", "YCbCr") else img.mode
    img.draft(mode, (int(np.ceil(need_w)), int(np.ceil(need_h))))
    return img.size[0] / w


def read_image_bytes(path: str) -> bytes:
    """The bytes of ``path`` (local or remote); a read failure is an ``ImageError``."""
    from reid_ray import io as rio

    try:
        return rio.read_bytes(path)
    except FileNotFoundError:
        raise ImageError(f"missing file: {path}") from None
    except IsADirectoryError:
        raise ImageError(f"path is a directory: {path}") from None
    except PermissionError:
        raise ImageError(f"permission denied: {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc}") from None


def _to_rgb_uint8(img) -> np.ndarray:
    """RGB uint8 from any PIL mode: greyscale, palette, CMYK, RGBA, 16-bit, float."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        grey = np.clip(arr, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.stack([grey] * 3, axis=-1))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        from PIL import Image

        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr)


def crop_bbox(img: np.ndarray, bbox: Sequence[float]) -> np.ndarray:
    """Crop ``x, y, w, h``; a box partly outside is clipped, one wholly outside is an error."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
        raise ImageError(f"bad bbox {list(bbox)}: width and height must be positive")
    height, width = img.shape[:2]
    x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
    x1, y1 = min(width, int(np.ceil(x + w))), min(height, int(np.ceil(y + h)))
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise ImageError(f"bbox {list(bbox)} lies outside the {width}x{height} image")
    return np.ascontiguousarray(img[y0:y1, x0:x1])


def resize_image(
    img: np.ndarray, size: tuple[int, int], mode: str = "resize", interpolation: str = "bilinear"
) -> np.ndarray:
    """Resize the whole crop to ``size`` (h, w): stretch (``resize``) or pad (``letterbox``).

    No centre crop: on re-ID crops it throws away half the animal (docs/design.md).
    """
    import cv2

    th, tw = int(size[0]), int(size[1])
    h, w = img.shape[:2]
    shrinking = th * tw < h * w
    interp = {
        "nearest": cv2.INTER_NEAREST,
        "bilinear": cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
        "bicubic": cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC,
    }.get(interpolation, cv2.INTER_LINEAR)
    if mode == "resize":
        return cv2.resize(img, (tw, th), interpolation=interp)
    if mode != "letterbox":
        raise ValueError(f"unknown resize mode {mode!r}: use 'resize' or 'letterbox'")
    scale = min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(img, (nw, nh), interpolation=interp)
    out = np.zeros((th, tw, 3), dtype=np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def load_image(
    path: str, bbox: Sequence[float] | None = None, *, target: tuple[int, int] | None = None
) -> np.ndarray:
    """Read ``path`` (local or remote) and decode it; a missing file is an ``ImageError``.
    ``target``: see :func:`decode_image`."""
    return decode_image(read_image_bytes(path), bbox, target=target)
