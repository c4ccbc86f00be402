"""The gallery and the nightly job (issue 12): a versioned gallery of known individuals,
``identify`` (known or new, for every new image) and ``merge`` (accepted results as a new
version, atomic and idempotent).

``store.py`` owns the folder layout and versions; ``decide.py`` the pure decision,
calibration and grouping; ``searcher.py`` the Ray actor pool that searches;
``reranking.py`` identify's local-feature re-ranking (through ``reid_ray.rerank``); ``build.py``,
``identification.py`` (identify), ``merge.py`` the three operations; ``commands.py`` the CLI.
Names are imported on first use, so ``reid-ray --help`` stays fast.
"""

from reid_ray.lazy import lazy_getattr

_EXPORTS = {
    "NightlyConfig": "config",
    "load_nightly_config": "config",
    "build_gallery": "build",
    "identify": "identification",
    "RESULTS_SCHEMA": "identification",
    "merge_results": "merge",
    "read_reviewed": "merge",
    "GalleryVersion": "store",
    "history": "store",
    "open_version": "store",
    "read_table": "store",
    "set_current": "store",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
