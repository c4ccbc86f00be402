"""Class-balanced P x K batches: P identities, K images of each, per batch.

Pure numpy over a label array (one worker's shard of an epoch). An identity with fewer
than K images is sampled with replacement; identities are drawn without replacement
within a batch. The number of batches is ``len(labels) // (P * K)``, so workers holding
equal shards take the same number of steps (DDP needs that).
"""

from __future__ import annotations

import numpy as np

from reid_ray.errors import ConfigError


def pk_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index arrays into ``labels`` (each ``[P * K]``), one per batch of the epoch.

    With fewer than ``p`` distinct labels, every batch holds all of them (and fewer rows).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}")
    if p < 1 or k < 1:
        raise ConfigError(f"P and K must be >= 1, got P={p}, K={k}")
    n_batches = len(labels) // (p * k)
    if n_batches == 0:
        return []
    classes, inverse = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    batches = []
    for _ in range(n_batches):
        chosen = rng.choice(len(classes), size=min(p, len(classes)), replace=False)
        parts = [rng.choice(members[c], size=k, replace=len(members[c]) < k) for c in chosen]
        batches.append(np.concatenate(parts))
    return batches
