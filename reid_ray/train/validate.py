"""Validation during training: embed the ``val`` rows, leave-one-out retrieval mAP.

Every validation image is a query against all the other validation images; an image
whose identity has no other validation image is not a query (it still serves as a
distractor in the others' galleries).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from reid_ray.evaluation.metrics import retrieval_metrics


def leave_one_out_metrics(
    embeddings: np.ndarray, identities: np.ndarray | list, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float | int]:
    """``{top1, top5, mAP, n_queries}`` of each row against all other rows (cosine)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    ids = np.asarray(identities, dtype=object)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"embeddings [N, D] and identities [N] disagree: {emb.shape}, {len(ids)}")
    if len(ids) < 2:
        return retrieval_metrics(np.empty(0, dtype=object), np.empty((0, 0), dtype=object), np.empty(0, int), ks)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :-1]  # self ranks last: drop it
    ranked = ids[order]
    values, counts = np.unique(ids.astype(str), return_counts=True)
    count_of = dict(zip(values, counts, strict=True))
    n_rel = np.array([count_of[str(i)] - 1 for i in ids], dtype=np.int64)
    return retrieval_metrics(ids, ranked, n_rel, ks)


def embed_batches(net, batches: Iterable[dict], preprocess, device) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``{"image": [N, H, W, 3] uint8, "identity": [N]}`` batches with ``net`` (eval)."""
    import torch

    was_training = net.training
    net.eval()
    embs, ids = [], []
    try:
        with torch.no_grad():
            for batch in batches:
                x = preprocess.normalize(batch["image"]).to(device)
                embs.append(net(x).float().cpu().numpy())
                ids.append(np.asarray(batch["identity"], dtype=object))
    finally:
        net.train(was_training)
    if not embs:
        return np.zeros((0, 0), np.float32), np.zeros(0, dtype=object)
    return np.concatenate(embs), np.concatenate(ids)
