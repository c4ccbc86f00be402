"""A manifest from a folder of images: the way in for a user's own pictures.

Two layouts:

* a folder of images (any depth): no identities, the manifest of a night or of an
  unlabelled collection;
* a folder per identity (``--by-identity``): ``ROOT/<identity>/...``, the identity is the
  name of the first sub-folder, as most labelled collections are shipped.

Images are found by content, not by extension: each file's first bytes are opened with
PIL (a PNG named ``.jpg`` is an image, a text file named ``.jpg`` is not). Files that are
not images, or whose header is corrupt, are not dropped: they are returned (and written)
as errors with their reason; an image cut short after its header is found when it is
decoded (the embed stage's errors table). Local folders and ``s3://`` prefixes read the
same way.
"""

from __future__ import annotations

import concurrent.futures
import io as _io
import logging
import os
import posixpath
from dataclasses import dataclass, field

import pandas as pd

from reid_ray import io as rio
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

#: bytes read to recognise a file; a header that needs more (some TIFFs) is read whole
HEAD_BYTES = 64 * 1024
#: concurrent reads: object stores answer one GET at a time per connection
READ_THREADS = 16


@dataclass
class FolderManifest:
    """The images found under a folder (``frame``: image_id, path, identity?) and the files
    that are not usable images (``errors``: path, reason)."""

    frame: pd.DataFrame
    errors: pd.DataFrame
    root: str
    by_identity: bool
    n_files: int = 0
    formats: dict[str, int] = field(default_factory=dict)


#: signatures of the common formats: a file that starts like one but does not open is a
#: corrupt image (its reason says so), not "not an image"
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def sniff_image(head: bytes, read_all=None) -> str:
    """The image format of a file from its first bytes (``"JPEG"``, ``"PNG"``...), or raise
    ``ValueError`` with the reason it is not a usable image. ``read_all()`` returns the
    whole file when the header needs more than ``head``."""
    from PIL import Image, UnidentifiedImageError

    if not head:
        raise ValueError("empty file (0 bytes)")
    for data in (head, None):
        if data is None:
            if read_all is None:
                break
            data = read_all()
            if len(data) <= len(head):
                break
        try:
            with Image.open(_io.BytesIO(data)) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise ValueError(f"image of size {width}x{height}")
                return str(img.format or "image")
        except UnidentifiedImageError:
            continue
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue
    signature = next((name for magic, name in SIGNATURES if head.startswith(magic)), None)
    if signature is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        signature = "WebP"
    if signature is not None:
        raise ValueError(f"corrupt {signature} file (its header does not read)")
    raise ValueError("not an image (unrecognised content)")


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if rio.is_remote(root) else os.path.relpath(path, root)


def _list_files(root: str) -> tuple[list[str], str]:
    """Every file under ``root`` (full paths as ``rio`` spells them, sorted) and the root."""
    fs, bare = rio.filesystem(root)
    if not fs.exists(bare):
        raise ConfigError(f"image folder not found: {root}")
    if not fs.isdir(bare):
        raise ConfigError(f"{root} is a file: --images takes a folder of images")
    if rio.is_remote(root):
        scheme = root.split("://", 1)[0]
        fs.invalidate_cache(bare)
        files = [f"{scheme}://{p}" for p in fs.find(bare)]
        return sorted(files), f"{scheme}://{bare.rstrip('/')}"
    files = [str(p) for p in fs.find(bare)]
    return sorted(files), bare


def scan_folder(
    root: str,
    *,
    by_identity: bool = False,
    exclude: tuple[str, ...] = (),
    threads: int = READ_THREADS,
    progress=None,
) -> FolderManifest:
    """The images under ``root`` as manifest rows; every other file as an error row.

    ``image_id`` is the path below ``root`` (unique and stable across reruns); ``path`` is
    the full path (local or ``s3://``). With ``by_identity`` the first sub-folder names the
    identity; images directly under ``root`` are kept with an empty (unknown) identity.
    ``exclude``: full paths to skip (the manifest being written). ``progress(done, total)``
    is called as files are read.
    """
    files, root_path = _list_files(root)
    skip = {os.path.abspath(p) if not rio.is_remote(p) else p for p in exclude}
    files = [f for f in files if f not in skip]
    if not files:
        raise ConfigError(f"no files under {root}")
    fs, _ = rio.filesystem(root)

    def bare_of(path: str) -> str:
        return rio.filesystem(path)[1]

    def check(path: str) -> tuple[str, str | None, str | None]:
        name = posixpath.basename(path)
        if name.startswith("."):
            return path, None, "hidden file (skipped)"
        try:
            head = fs.cat_file(bare_of(path), start=0, end=HEAD_BYTES)
            kind = sniff_image(head, read_all=lambda: fs.cat_file(bare_of(path)))
            return path, kind, None
        except ValueError as exc:
            return path, None, str(exc)
        except OSError as exc:
            return path, None, f"cannot read: {exc}"

    results: list[tuple[str, str | None, str | None]] = []
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for done, result in enumerate(pool.map(check, files), start=1):
            results.append(result)
            if progress is not None and (done % 64 == 0 or done == len(files)):
                progress(done, len(files))

    rows, errors, formats = [], [], {}
    for path, kind, reason in results:
        rel = _relative(path, root_path).replace(os.sep, "/")
        if reason is not None:
            errors.append({"path": path, "reason": reason})
            continue
        formats[kind] = formats.get(kind, 0) + 1
        row = {"image_id": rel, "path": path}
        if by_identity:
            parts = rel.split("/")
            row["identity"] = parts[0] if len(parts) > 1 else ""
        rows.append(row)
    columns = ["image_id", "path", *(["identity"] if by_identity else [])]
    frame = pd.DataFrame(rows, columns=columns)
    logger.info("%s: %d files, %d images, %d not usable", root, len(files), len(frame), len(errors))
    return FolderManifest(
        frame=frame,
        errors=pd.DataFrame(errors, columns=["path", "reason"]),
        root=root_path,
        by_identity=by_identity,
        n_files=len(files),
        formats=formats,
    )


def errors_path_for(manifest_path: str) -> str:
    """Where the files that are not images are listed: ``<manifest stem>.errors.csv``."""
    stem = manifest_path[:-4] if manifest_path.lower().endswith(".csv") else manifest_path
    return f"{stem}.errors.csv"


def check_manifest_out(out: str) -> None:
    """The manifest written from a folder is a CSV file: anything else is a ConfigError."""
    if not str(out).lower().endswith(".csv"):
        raise ConfigError(f"--out names the manifest file to write, a .csv: got {out}")


def write_folder_manifest(scan: FolderManifest, out: str) -> str:
    """Write ``scan`` as the CSV manifest ``out`` (paths relative to its folder when the
    images sit below it, so the folder can move) and its errors next to it; atomically.
    Returns the errors file's path."""
    check_manifest_out(out)
    frame = scan.frame.copy()
    base = rio.dirname(out)
    if not rio.is_remote(out) and not rio.is_remote(scan.root):
        inside = os.path.commonpath([os.path.abspath(scan.root), base]) == base
        if inside:
            frame["path"] = [os.path.relpath(p, base).replace(os.sep, "/") for p in frame["path"]]
    rio.write_bytes_atomic(out, frame.to_csv(index=False).encode("utf-8"))
    errors_out = errors_path_for(out)
    rio.write_bytes_atomic(errors_out, scan.errors.to_csv(index=False).encode("utf-8"))
    return errors_out


__all__ = [
    "FolderManifest",
    "check_manifest_out",
    "errors_path_for",
    "scan_folder",
    "sniff_image",
    "write_folder_manifest",
]
