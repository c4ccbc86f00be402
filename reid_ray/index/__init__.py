"""Retrieval: a FAISS index of gallery embeddings, top-K search, candidates Parquet.

``faiss_index.py`` holds the pure parts (build, search, save/load); ``jobs.py`` the
``index``/``search`` jobs over embed outputs; ``candidates.py`` the candidates table.
Names are imported on first use (FAISS only when an index is built or read).
"""

from reid_ray.lazy import lazy_getattr

_EXPORTS = {
    "CANDIDATES_SCHEMA": "candidates",
    "candidates_table": "candidates",
    "candidates_to_matrix": "candidates",
    "read_candidates": "candidates",
    "DEFAULT_EXACT_THRESHOLD": "faiss_index",
    "DEFAULT_K": "faiss_index",
    "GalleryIndex": "faiss_index",
    "build_index": "faiss_index",
    "load_index": "faiss_index",
    "save_index": "faiss_index",
    "search": "faiss_index",
    "index_embeddings": "jobs",
    "search_embeddings": "jobs",
    "select_rows": "jobs",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
