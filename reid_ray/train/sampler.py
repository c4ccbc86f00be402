"""Class-balanced P x K batches: P identities, K images of each, per batch.

:func:`pk_batches` is pure numpy over a label array. An identity with fewer than K images
is sampled with replacement; identities are drawn without replacement within a batch.

:func:`stream_pk_batches` applies it to a stream of decoded rows without holding the
worker's shard: it fills a bounded window (the training rows arrive grouped by identity,
so a window holds whole identities), draws batches from it, and moves on. It yields
exactly ``rows // (P * K)`` batches for ``rows`` streamed, so workers holding equal
shards take the same number of steps (DDP needs that).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from reid_ray.errors import ConfigError


def pk_batches(
    labels: np.ndarray, p: int, k: int, rng: np.random.Generator, n_batches: int | None = None
) -> list[np.ndarray]:
    """Index arrays into ``labels`` (each ``[P * K]``): ``n_batches`` of them (default
    ``len(labels) // (P * K)``).

    With fewer than ``p`` distinct labels, every batch holds all of them (and fewer rows).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}")
    if p < 1 or k < 1:
        raise ConfigError(f"P and K must be >= 1, got P={p}, K={k}")
    if n_batches is None:
        n_batches = len(labels) // (p * k)
    if n_batches <= 0 or len(labels) == 0:
        return []
    classes, inverse = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    batches = []
    for _ in range(n_batches):
        chosen = rng.choice(len(classes), size=min(p, len(classes)), replace=False)
        parts = [rng.choice(members[c], size=k, replace=len(members[c]) < k) for c in chosen]
        batches.append(np.concatenate(parts))
    return batches


def stream_pk_batches(
    batches: Iterable[dict], p: int, k: int, rng: np.random.Generator, window: int
) -> Iterator[dict]:
    """``{"image", "label"}`` numpy P x K batches from a stream of decoded row batches,
    holding at most about ``window`` rows at a time."""
    rows_per_batch = p * k
    seen = emitted = 0
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    held = 0

    def drain():
        nonlocal emitted, images, labels, held
        if not images:
            return
        img, lab = np.concatenate(images), np.concatenate(labels)
        due = seen // rows_per_batch - emitted
        for idx in pk_batches(lab, p, k, rng, n_batches=due):
            emitted += 1
            yield {"image": img[idx], "label": lab[idx]}
        images, labels, held = [], [], 0

    for batch in batches:
        lab = np.asarray(batch["label"], dtype=np.int64)
        images.append(np.asarray(batch["image"]))
        labels.append(lab)
        held += len(lab)
        seen += len(lab)
        if held >= window:
            yield from drain()
    yield from drain()
