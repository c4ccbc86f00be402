"""Manifests: the one table every stage starts from, validated once at the door.

Column names follow wildlife-datasets (``image_id``, ``identity``, ``path``, ``species``,
``viewpoint``, ``bbox``, ``date``) so its metadata tables load as they are. Rows that cannot
be used go to ``Manifest.errors`` with a reason; a manifest that cannot be used at all
raises ``ManifestError``.
"""

from __future__ import annotations

import ast
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.errors import ManifestError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image_id", "path")
OPTIONAL_COLUMNS = ("identity", "species", "viewpoint", "bbox", "date", "split", "mask")
UNKNOWN_IDENTITIES = {"", "unknown", "nan", "none", "null"}

BBOX_TYPE = pa.list_(pa.float32(), 4)  # x, y, w, h in pixels; null: the whole image

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("identity", pa.string()),
        ("species", pa.string()),
        ("viewpoint", pa.string()),
        ("bbox", BBOX_TYPE),
        ("date", pa.string()),
        ("split", pa.string()),
        ("mask", pa.string()),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)


def empty_errors() -> pa.Table:
    return ERRORS_SCHEMA.empty_table()


def errors_table(rows: list[dict]) -> pa.Table:
    """Rows of ``{image_id, path, stage, reason}`` as an errors table."""
    if not rows:
        return empty_errors()
    cols = {
        name: [None if r.get(name) is None else str(r.get(name)) for r in rows]
        for name in ERRORS_SCHEMA.names
    }
    return pa.table(cols, schema=ERRORS_SCHEMA)


@dataclass
class Manifest:
    """A validated manifest: usable rows, rejected rows with reasons, and warnings."""

    table: pa.Table
    errors: pa.Table = field(default_factory=empty_errors)
    warnings: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return self.table.num_rows

    def to_pandas(self) -> pd.DataFrame:
        return self.table.to_pandas()

    def select_splits(self, *names: str) -> Manifest:
        """The rows whose ``split`` is one of ``names``."""
        import pyarrow.compute as pc

        mask = pc.is_in(self.table["split"], value_set=pa.array(list(names), pa.string()))
        mask = pc.fill_null(mask, False)
        return Manifest(self.table.filter(mask), self.errors, list(self.warnings), self.source)

    def identity_of(self) -> dict[str, str]:
        """image_id -> identity for the labelled rows (the one lookup every stage uses)."""
        if "identity" not in self.table.column_names:
            return {}
        return {
            i: v
            for i, v in zip(
                self.table["image_id"].to_pylist(), self.table["identity"].to_pylist(), strict=True
            )
            if v is not None
        }

    def labelled(self) -> Manifest:
        import pyarrow.compute as pc

        return Manifest(
            self.table.filter(pc.is_valid(self.table["identity"])),
            self.errors,
            list(self.warnings),
            self.source,
        )


def parse_bbox(value) -> list[float] | None:
    """``x,y,w,h`` or ``[x, y, w, h]`` (string or sequence) -> 4 floats; None when empty.

    Raises ``ValueError`` with a reason for anything else (never ``eval``).
    """
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() in ("nan", "none", "null"):
            return None
        if text.startswith(("[", "(")):
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"bad bbox {value!r}: expected x,y,w,h") from None
        else:
            parsed = [p for p in text.replace(";", ",").split(",")]
        items = list(parsed)
    else:
        items = list(np.asarray(value).ravel())
    if len(items) != 4:
        raise ValueError(f"bad bbox {value!r}: expected 4 numbers x,y,w,h, got {len(items)}")
    try:
        x, y, w, h = (float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"bad bbox {value!r}: not numbers") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"bad bbox {value!r}: not finite")
    if w <= 0 or h <= 0:
        raise ValueError(f"bad bbox {value!r}: width and height must be positive")
    return [x, y, w, h]


def _read_frame(path: str) -> pd.DataFrame:
    fs, bare = rio.filesystem(path)
    if not fs.exists(bare):
        raise ManifestError(f"manifest not found: {path}")
    if fs.isdir(bare):
        raise ManifestError(
            f"manifest {path} is a folder, not a CSV or Parquet file: for a folder of images "
            f"write one first with `reid-ray manifest --images {path} --out "
            f"{rio.join(path, 'manifest.csv')}`"
        )
    lower = path.lower()
    try:
        with fs.open(bare, "rb") as f:
            if lower.endswith((".parquet", ".pq")):
                import pyarrow.parquet as pq

                return pq.read_table(f).to_pandas()
            if lower.endswith((".csv", ".csv.gz", ".tsv")):
                sep = "\t" if lower.endswith(".tsv") else ","
                compression = "gzip" if lower.endswith(".gz") else None
                return pd.read_csv(
                    f, dtype=str, keep_default_na=False, sep=sep, compression=compression
                )
    except pd.errors.EmptyDataError:
        raise ManifestError(f"manifest is empty: {path}") from None
    except (pa.ArrowInvalid, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot parse manifest {path}: {exc}") from None
    raise ManifestError(f"unsupported manifest format {path!r}: use .csv or .parquet")


def _clean_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = str(value).strip()
    return text or None


def read_manifest(path: str, split_file: str | None = None) -> Manifest:
    """Read and validate a CSV or Parquet manifest (local or ``s3://``).

    Paths are resolved against the manifest's folder. With ``split_file``, its ``split``
    column replaces the manifest's own.
    """
    frame = _read_frame(str(path))
    return validate_manifest(
        frame, base_dir=rio.dirname(str(path)), source=str(path), split_file=split_file
    )


def validate_manifest(
    frame: pd.DataFrame, *, base_dir: str, source: str = "", split_file: str | None = None
) -> Manifest:
    """Validate a manifest frame: required columns, unique ids, parsable fields."""
    if frame.shape[1] == 0 or len(frame) == 0:
        raise ManifestError(f"manifest is empty (no rows): {source or '<frame>'}")
    frame = frame.rename(columns={c: str(c).strip() for c in frame.columns})
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(
            f"manifest {source or '<frame>'} lacks required column(s) {missing}; "
            f"it has {list(frame.columns)}"
        )
    warnings: list[str] = []
    unknown = [c for c in frame.columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        warnings.append(f"ignored unknown column(s): {', '.join(map(str, unknown))}")
        logger.warning("manifest %s: %s", source, warnings[-1])

    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    errors: list[dict] = []
    seen: dict[str, int] = {}
    get = {
        c: (frame[c].tolist() if c in frame.columns else [None] * len(frame))
        for c in MANIFEST_SCHEMA.names
    }
    for i in range(len(frame)):
        image_id = _clean_str(get["image_id"][i])
        raw_path = _clean_str(get["path"][i])
        resolved = rio.resolve(raw_path, base_dir) if raw_path else None
        if image_id is None:
            errors.append(
                dict(
                    image_id=None,
                    path=resolved,
                    stage="manifest",
                    reason=f"row {i}: empty image_id",
                )
            )
            continue
        if image_id in seen:
            errors.append(
                dict(
                    image_id=image_id,
                    path=resolved,
                    stage="manifest",
                    reason=f"duplicate image_id (first seen at row {seen[image_id]}, this is row {i})",
                )
            )
            continue
        if resolved is None:
            errors.append(dict(image_id=image_id, path=None, stage="manifest", reason="empty path"))
            continue
        try:
            bbox = parse_bbox(get["bbox"][i])
        except ValueError as exc:
            errors.append(dict(image_id=image_id, path=resolved, stage="manifest", reason=str(exc)))
            continue
        seen[image_id] = i
        identity = _clean_str(get["identity"][i])
        if identity is not None and identity.lower() in UNKNOWN_IDENTITIES:
            identity = None
        mask = _clean_str(get["mask"][i])
        rows["image_id"].append(image_id)
        rows["path"].append(resolved)
        rows["identity"].append(identity)
        rows["species"].append(_clean_str(get["species"][i]))
        rows["viewpoint"].append(_clean_str(get["viewpoint"][i]))
        rows["bbox"].append(bbox)
        rows["date"].append(_clean_str(get["date"][i]))
        rows["split"].append(_clean_str(get["split"][i]))
        rows["mask"].append(rio.resolve(mask, base_dir) if mask else None)
    table = pa.table(rows, schema=MANIFEST_SCHEMA)
    manifest = Manifest(table, errors_table(errors), warnings, source)
    if split_file:
        manifest = apply_split(manifest, split_file)
    if manifest.table.num_rows == 0:
        raise ManifestError(
            f"manifest {source or '<frame>'} has no usable rows ({manifest.errors.num_rows} rejected; "
            f"first reason: {manifest.errors['reason'][0].as_py() if manifest.errors.num_rows else '-'})"
        )
    if errors:
        logger.warning("manifest %s: %d row(s) rejected", source, len(errors))
    return manifest


def apply_split(manifest: Manifest, split_file: str) -> Manifest:
    """Set each row's ``split`` from a split file (``image_id,split``); rows not named: null."""
    from reid_ray.data.splits import read_split

    split = read_split(split_file)
    mapping = dict(zip(split["image_id"].astype(str), split["split"], strict=True))
    ids = manifest.table["image_id"].to_pylist()
    unknown_ids = set(mapping) - set(ids)
    warnings = list(manifest.warnings)
    if unknown_ids:
        warnings.append(f"split file names {len(unknown_ids)} image_id(s) absent from the manifest")
    values = pa.array([mapping.get(i) for i in ids], pa.string())
    idx = manifest.table.schema.get_field_index("split")
    table = manifest.table.set_column(idx, "split", values)
    return Manifest(table, manifest.errors, warnings, manifest.source)
