"""The split maker: seeded, per-individual splits written as ``image_id,split`` CSV files.

A split file (README.md, Contracts) is a CSV with columns ``image_id`` and ``split``, ``split`` one of
:data:`SPLIT_NAMES`; rows not named are unused. ``query_unknown`` images belong to an
individual absent from the gallery: the right answer for them is "new".

Splits are made per individual (all images of one identity are decided together) and are
identical on every machine and every numpy/pandas version: the order of identities and of
images comes from SHA-256 hashes of ``f"{seed}:{identity}"`` (and of the image ids), never
from a library RNG stream, whose output may change between versions. wildlife-datasets
(``wildlife_datasets/splits/lcg.py``) ships its own LCG for the same reason. Because the
order depends only on the values, the split does not depend on the input's row order.
"""

from __future__ import annotations

import hashlib
import logging
import math

import pandas as pd

from reid_ray import io
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "query", "gallery", "query_unknown")
SPLIT_KINDS = ("closed", "open", "disjoint")
UNKNOWN_IDENTITY = "unknown"


def _hash_key(*parts: object) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def labelled_mask(identities: pd.Series) -> pd.Series:
    """True where an identity is known: not null, not empty, not ``"unknown"`` (any case)."""
    text = identities.astype("string").str.strip()
    return (text.notna() & (text != "") & (text.str.lower() != UNKNOWN_IDENTITY)).fillna(False)


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= float(value) <= 1.0):
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")


def _query_gallery(
    image_ids: list[str], identity: str, seed: int, queries_per_identity: int
) -> dict[str, str]:
    """Closed-set assignment of one identity's images: some to query, at least one to gallery."""
    ordered = sorted(image_ids, key=lambda i: (_hash_key(seed, "image", identity, i), i))
    n_query = min(queries_per_identity, len(ordered) - 1) if len(ordered) >= 2 else 0
    out = {i: "query" for i in ordered[:n_query]}
    out.update({i: "gallery" for i in ordered[n_query:]})
    return out


def _n_unknown(n_test: int, unknown_fraction: float) -> int:
    """How many test identities to hold out: at least one known stays; at least one unknown
    when ``unknown_fraction > 0`` and there are two or more test identities."""
    if n_test == 0:
        return 0
    n = _round_half_up(unknown_fraction * n_test)
    if unknown_fraction > 0 and n_test >= 2:
        n = max(n, 1)
    return min(n, n_test - 1)


def make_split(
    df: pd.DataFrame,
    *,
    kind: str = "disjoint",
    seed: int = 0,
    train_fraction: float = 0.5,
    val_fraction: float = 0.1,
    unknown_fraction: float = 0.2,
    queries_per_identity: int = 2,
) -> pd.DataFrame:
    """A per-individual split of ``df`` (columns ``image_id``, ``identity``; others ignored).

    Kinds:

    - ``"closed"``: every identity in query and gallery. Per identity with >= 2 images,
      ``min(queries_per_identity, n - 1)`` images go to ``query`` and the rest (at least one)
      to ``gallery``; singletons go to ``gallery``.
    - ``"open"``: like closed, but ``unknown_fraction`` of the identities (rounded half up;
      at least one when the fraction is > 0 and there are >= 2 identities; never all of
      them) are held out completely as ``query_unknown``.
    - ``"disjoint"``: identities divided into ``train`` (``train_fraction``, rounded half up),
      ``val`` (``val_fraction``) and test (the rest); the test identities are split open-set
      as above.

    Unlabelled rows (identity null, empty or ``"unknown"``) are left out of the split.
    Returns a DataFrame with columns ``image_id`` and ``split`` holding the assigned rows in
    input order. Same input values and seed give the same split on every machine,
    whatever the row order.
    """
    if kind not in SPLIT_KINDS:
        raise ConfigError(f"unknown split kind {kind!r}; expected one of {', '.join(SPLIT_KINDS)}")
    for name, value in (
        ("train_fraction", train_fraction),
        ("val_fraction", val_fraction),
        ("unknown_fraction", unknown_fraction),
    ):
        _check_fraction(name, value)
    if train_fraction + val_fraction > 1.0 + 1e-12:
        raise ConfigError(
            f"train_fraction + val_fraction must be <= 1, got {train_fraction} + {val_fraction}"
        )
    if isinstance(queries_per_identity, bool) or not isinstance(queries_per_identity, int):
        raise ConfigError(f"queries_per_identity must be an integer, got {queries_per_identity!r}")
    if queries_per_identity < 1:
        raise ConfigError(f"queries_per_identity must be >= 1, got {queries_per_identity}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    missing = [c for c in ("image_id", "identity") if c not in df.columns]
    if missing:
        raise ConfigError(f"make_split needs columns image_id and identity; missing: {missing}")

    image_ids = df["image_id"].astype(str)
    dup = image_ids[image_ids.duplicated()]
    if len(dup):
        raise ConfigError(
            f"image_id must be unique to make a split; {dup.nunique()} duplicated, "
            f"e.g. {dup.iloc[0]!r}"
        )
    labelled = labelled_mask(df["identity"]).to_numpy(dtype=bool)
    n_unlabelled = int((~labelled).sum())
    if n_unlabelled:
        logger.info("make_split: %d unlabelled rows left out of the split", n_unlabelled)
    identities = df["identity"].astype("string").str.strip()

    by_identity: dict[str, list[str]] = {}
    for image_id, identity, ok in zip(image_ids, identities, labelled, strict=True):
        if ok:
            by_identity.setdefault(str(identity), []).append(image_id)
    ordered_ids = sorted(by_identity, key=lambda i: (_hash_key(seed, i), i))

    if kind == "disjoint":
        n = len(ordered_ids)
        n_train = min(_round_half_up(train_fraction * n), n)
        n_val = min(_round_half_up(val_fraction * n), n - n_train)
        train_ids = ordered_ids[:n_train]
        val_ids = ordered_ids[n_train : n_train + n_val]
        test_ids = ordered_ids[n_train + n_val :]
    else:
        train_ids, val_ids, test_ids = [], [], ordered_ids

    n_unknown = _n_unknown(len(test_ids), unknown_fraction) if kind != "closed" else 0
    unknown_ids = test_ids[:n_unknown]
    known_ids = test_ids[n_unknown:]

    assignment: dict[str, str] = {}
    for split_name, ids in (("train", train_ids), ("val", val_ids), ("query_unknown", unknown_ids)):
        for identity in ids:
            assignment.update({i: split_name for i in by_identity[identity]})
    for identity in known_ids:
        images = by_identity[identity]
        assignment.update(_query_gallery(images, identity, seed, queries_per_identity))

    keep = [i in assignment for i in image_ids]
    out = pd.DataFrame(
        {
            "image_id": image_ids[keep].to_numpy(dtype=object),
            "split": [assignment[i] for i in image_ids[keep]],
        }
    )
    logger.info(
        "make_split(kind=%s, seed=%d): %s",
        kind,
        seed,
        out["split"].value_counts().to_dict() if len(out) else {},
    )
    return out


def _validate_split_table(split_df: pd.DataFrame, where: str) -> None:
    missing = [c for c in ("image_id", "split") if c not in split_df.columns]
    if missing:
        raise ConfigError(f"{where}: a split needs columns image_id and split; missing: {missing}")
    bad = sorted({str(s) for s in split_df["split"] if s not in SPLIT_NAMES})
    if bad:
        raise ConfigError(
            f"{where}: invalid split name(s) {bad}; allowed: {', '.join(SPLIT_NAMES)}"
        )
    ids = split_df["image_id"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ConfigError(
            f"{where}: image_id listed more than once ({dup.nunique()} ids, e.g. {dup.iloc[0]!r})"
        )


def write_split(split_df: pd.DataFrame, path: str) -> None:
    """Write ``split_df`` as a CSV ``image_id,split`` (local or ``s3://``), atomically."""
    _validate_split_table(split_df, "write_split")
    table = pd.DataFrame(
        {"image_id": split_df["image_id"].astype(str), "split": split_df["split"].astype(str)}
    )
    io.write_bytes_atomic(path, table.to_csv(index=False).encode("utf-8"))


def read_split(path: str) -> pd.DataFrame:
    """Read a split file; columns ``image_id`` and ``split`` (both str).

    Rows with an empty split are unused and dropped. An unknown split name, a missing
    column or a repeated ``image_id`` raise :class:`~reid_ray.errors.ConfigError`.
    """
    if not io.exists(path):
        raise ConfigError(f"split file not found: {path}")
    fs, bare = io.filesystem(path)
    try:
        with fs.open(bare, "rb") as f:
            df = pd.read_csv(f, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ConfigError(f"split file {path} is not a readable CSV: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("image_id", "split") if c not in df.columns]
    if missing:
        raise ConfigError(f"split file {path} needs columns image_id and split; missing: {missing}")
    df = df[["image_id", "split"]].copy()
    df["image_id"] = df["image_id"].str.strip()
    df["split"] = df["split"].str.strip()
    unused = df["split"] == ""
    if unused.any():
        n_unused = int(unused.sum())
        logger.info("split file %s: %d rows with an empty split are unused", path, n_unused)
        df = df[~unused].reset_index(drop=True)
    _validate_split_table(df, f"split file {path}")
    return df
