"""Which manifest rows train, which validate, and which identities are kept out for
calibration. Pure pyarrow/numpy on the manifest's metadata (no images, no Ray).

The held-out calibration identities (issue 14) let the open-set ("new individual")
decision be fitted on images the model never trained on: a model trained on the gallery
scores every gallery pair "same", so a calibration fitted on its own training images says
nothing about animals it has not seen.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reid_ray.data import Manifest


def select_training_rows(manifest: Manifest) -> tuple[pa.Table, pa.Table, dict]:
    """(train rows, val rows, counts). Without any ``split`` values every labelled row trains."""
    table = manifest.table
    has_split = table.num_rows > 0 and pc.any(pc.is_valid(table["split"])).as_py()
    if has_split:
        train, val = manifest.select_splits("train").table, manifest.select_splits("val").table
    else:
        train, val = table, table.slice(0, 0)
    labelled = pc.is_valid(train["identity"])
    counts = {
        "split_used": bool(has_split),
        "train_rows": train.num_rows,
        "train_unlabelled_skipped": train.num_rows - int(pc.sum(labelled).as_py() or 0),
    }
    train = train.filter(labelled)
    val = val.filter(pc.is_valid(val["identity"]))
    return train, val, counts


def class_table(train: pa.Table) -> tuple[list[str], np.ndarray]:
    """Sorted identities (class index = position) and their image counts."""
    ids, counts = np.unique(
        np.asarray(train["identity"].to_pylist(), dtype=str), return_counts=True
    )
    return [str(i) for i in ids], counts


def calibration_identities(
    identities: list[str], fraction: float, min_identities: int, seed: int
) -> list[str]:
    """The identities held out for calibration: ``round(fraction * n)``, but at least
    ``MIN_HELDOUT_IDENTITIES`` (what the known-vs-new decision needs to trust them) or a
    quarter of them, of the ``n`` sorted ``identities`` when ``n >= min_identities``, else
    none. Seeded: the same identities on every machine; at least two always train."""
    from reid_ray.decide.config import MIN_HELDOUT_IDENTITIES

    ids = sorted(set(map(str, identities)))
    if fraction <= 0 or len(ids) < min_identities:
        return []
    floor = min(MIN_HELDOUT_IDENTITIES, len(ids) // 4)
    n = min(max(1, floor, int(round(fraction * len(ids)))), len(ids) - 2)
    rng = np.random.default_rng(seed)
    return sorted(ids[i] for i in rng.choice(len(ids), size=n, replace=False))


def split_calibration(train: pa.Table, held_out: list[str]) -> tuple[pa.Table, pa.Table]:
    """(rows that train, rows of the held-out identities)."""
    if not held_out:
        return train, train.slice(0, 0)
    mask = pc.is_in(train["identity"], value_set=pa.array(held_out, type=train["identity"].type))
    return train.filter(pc.invert(mask)), train.filter(mask)


def group_by_identity(train: pa.Table, seed: int) -> pa.Table:
    """Rows of one identity next to each other, identities in a seeded random order: the
    blocks a worker streams then hold whole identities, which the streaming P x K sampler
    (:func:`reid_ray.train.sampler.stream_pk_batches`) needs to find K images of each."""
    ids = np.asarray(train["identity"].to_pylist(), dtype=str)
    classes, inverse = np.unique(ids, return_inverse=True)
    rank = np.random.default_rng(seed).permutation(len(classes))[inverse]
    return train.take(pa.array(np.argsort(rank, kind="stable")))
