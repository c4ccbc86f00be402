"""wildlife-datasets metadata tables -> reid-ray manifests, so its 30+ datasets load as they are.

wildlife-datasets (``WildlifeDatasets/wildlife-datasets``) describes each dataset with one
table: ``image_id`` (int or str), ``identity`` (``"unknown"`` for unlabelled animals),
``path`` (relative to the dataset's root), and optionally ``bbox`` (a list ``[x, y, w, h]``),
``date``, ``species`` (a string or a list), ``orientation`` (our ``viewpoint``) and columns
reid-ray does not use (``keypoints``, ``segmentation``, ``video``, ``position``, ...).

:func:`wildlife_to_manifest` converts such a table (a DataFrame, a ``DatasetClass(root)``
object with ``.df`` and ``.root``, or a CSV/Parquet file of it) into our manifest columns.
Nothing is dropped silently: rows keep their values and the manifest reader records bad
ones (duplicate ids, bad boxes, missing files) in its errors table; columns we do not use
are listed in the returned :class:`WildlifeConversion`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from reid_ray import io as rio
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

#: wildlife-datasets column -> manifest column (names not listed keep their name)
RENAMES = {"orientation": "viewpoint"}
MANIFEST_COLUMNS = ("image_id", "path", "identity", "species", "viewpoint", "bbox", "date")


@dataclass
class WildlifeConversion:
    """The converted manifest and what the conversion did to the table."""

    frame: pd.DataFrame
    dropped_columns: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _text(value: Any) -> str:
    """A cell as text; integers stored as floats by pandas (``12.0``) lose the ``.0``."""
    if _is_empty(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _species(value: Any) -> str:
    """wildlife-datasets allows a list of species per image (e.g. mixed groups): joined by +."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return "+".join(_text(v) for v in value if not _is_empty(v))
    return _text(value)


def _bbox(value: Any) -> str:
    """A list ``[x, y, w, h]`` as the manifest's ``x,y,w,h`` text; text is passed through for
    the manifest reader to check (a bad box becomes an errors row there, with its reason)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ",".join(_text(float(v)) for v in value)
    return _text(value)


def _date(values: pd.Series) -> pd.Series:
    """ISO dates (``YYYY-MM-DD`` or with a time when one is given); unparseable text is kept
    as it is, so a later reader can still see it."""
    text = values.map(_text)
    parsed = pd.to_datetime(text.where(text != ""), errors="coerce", format="mixed")
    has_time = parsed.notna() & (parsed != parsed.dt.normalize())
    iso = parsed.dt.strftime("%Y-%m-%d").where(~has_time, parsed.dt.strftime("%Y-%m-%dT%H:%M:%S"))
    return iso.where(parsed.notna(), text).fillna("")


def _table_of(source: Any, root: str | None) -> tuple[pd.DataFrame, str | None]:
    if isinstance(source, pd.DataFrame):
        return source, root
    if hasattr(source, "df") and isinstance(source.df, pd.DataFrame):  # DatasetClass(root)
        return source.df, root or getattr(source, "root", None)
    if isinstance(source, str):
        if not rio.exists(source):
            raise ConfigError(f"wildlife metadata table not found: {source}")
        fs, bare = rio.filesystem(source)
        with fs.open(bare, "rb") as f:
            frame = pd.read_parquet(f) if source.endswith(".parquet") else pd.read_csv(f)
        return frame, root or rio.dirname(source)
    raise ConfigError(
        "a wildlife-datasets source is a DataFrame, a dataset object with .df, or a CSV/Parquet "
        f"path; got {type(source).__name__}"
    )


def wildlife_to_manifest(
    source: Any, *, root: str | None = None, species: str | None = None
) -> WildlifeConversion:
    """Convert a wildlife-datasets metadata table into manifest columns.

    ``root``: the dataset's folder; relative paths are joined to it (default: the object's
    ``.root``, or the table file's folder). ``species`` fills rows without one (most
    single-species datasets have no ``species`` column).
    """
    frame, root = _table_of(source, root)
    missing = [c for c in ("image_id", "path") if c not in frame.columns]
    if missing:
        raise ConfigError(
            f"a wildlife-datasets table needs columns image_id and path; missing {missing} "
            f"(columns: {', '.join(map(str, frame.columns))})"
        )
    frame = frame.rename(columns={k: v for k, v in RENAMES.items() if v not in frame.columns})
    dropped = [str(c) for c in frame.columns if c not in MANIFEST_COLUMNS]
    out = pd.DataFrame({"image_id": frame["image_id"].map(_text)})
    paths = frame["path"].map(_text)
    if root:
        paths = paths.map(
            lambda p: p if (not p or rio.is_remote(p) or os.path.isabs(p)) else rio.join(root, p)
        )
    out["path"] = paths
    out["identity"] = frame["identity"].map(_text) if "identity" in frame else ""
    out["species"] = frame["species"].map(_species) if "species" in frame else ""
    if species:
        out["species"] = out["species"].where(out["species"] != "", species)
    out["viewpoint"] = frame["viewpoint"].map(_text) if "viewpoint" in frame else ""
    out["bbox"] = frame["bbox"].map(_bbox) if "bbox" in frame else ""
    out["date"] = _date(frame["date"]) if "date" in frame else ""
    unknown = out["identity"].str.lower().isin(("", "unknown"))
    counts = {
        "rows": len(out),
        "identities": int(out.loc[~unknown, "identity"].nunique()),
        "unknown_identity_rows": int(unknown.sum()),
        "with_bbox": int((out["bbox"] != "").sum()),
        "with_date": int((out["date"] != "").sum()),
    }
    if dropped:
        logger.info("wildlife table: columns not used by reid-ray: %s", ", ".join(dropped))
    return WildlifeConversion(out.reset_index(drop=True), dropped, counts)


def load_wildlife_dataset(name: str, root: str, **kwargs: Any) -> Any:
    """``wildlife_datasets.datasets.<name>(root)``; needs the optional ``wildlife-datasets``
    package (``pip install wildlife-datasets``) and the dataset downloaded under ``root``."""
    try:
        from wildlife_datasets import datasets as wd
    except ImportError:
        raise ConfigError(
            f"wildlife dataset {name!r}: the wildlife-datasets package is not installed "
            "(pip install wildlife-datasets), or give its metadata table as a CSV/Parquet file"
        ) from None
    cls = getattr(wd, name, None)
    if cls is None:
        raise ConfigError(f"wildlife-datasets has no dataset class {name!r}")
    if not os.path.isdir(root):
        raise ConfigError(f"wildlife dataset {name!r}: root folder not found: {root}")
    return cls(root, **kwargs)


def write_wildlife_manifest(
    source: Any, out_path: str, *, root: str | None = None, species: str | None = None
) -> WildlifeConversion:
    """Convert and write the manifest CSV atomically (local or ``s3://``)."""
    conv = wildlife_to_manifest(source, root=root, species=species)
    rio.write_bytes_atomic(out_path, conv.frame.to_csv(index=False).encode("utf-8"))
    return conv
