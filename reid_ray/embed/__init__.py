"""Distributed embedding: decoded crops -> L2-normalised vectors, streamed to Parquet.

``Embedder`` (``embedder.py``) is the pure kernel; ``embed``/``embed_manifest``
(``pipeline.py``) wire it into a Ray Data actor pool; ``store.py`` owns the on-disk layout
(atomic parts, resume, readers); ``config.py`` the settings and the resource plan.
Names are imported on first use, so ``reid-ray --help`` stays fast.
"""

from reid_ray.lazy import lazy_getattr

_EXPORTS = {
    "EmbedConfig": "config",
    "load_embed_config": "config",
    "ResourcePlan": "config",
    "plan_resources": "config",
    "Embedder": "embedder",
    "embedding_key": "embedder",
    "l2_normalize": "embedder",
    "EmbedSummary": "pipeline",
    "embed": "pipeline",
    "embed_manifest": "pipeline",
    "EMBEDDINGS_SCHEMA": "store",
    "EmbeddingSet": "store",
    "embeddings_table": "store",
    "iter_embedding_batches": "store",
    "read_embeddings": "store",
    "read_errors": "store",
    "scan_existing": "store",
    "table_to_matrix": "store",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
