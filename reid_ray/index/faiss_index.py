"""FAISS retrieval over L2-normalised embeddings: inner product = cosine similarity.

``build_index`` picks exact search (``IndexFlatIP``) below ``exact_threshold`` gallery
items and an inverted file (``IndexIVFFlat``, inner product) above it, and moves the index
to the GPUs when FAISS sees any. ``search`` returns scores and gallery ids, padded with
``-inf``/``None`` when the gallery is smaller than k. ``save_index``/``load_index`` write
a folder (index bytes + id mapping + description) locally or on ``s3://``.

Why these defaults: re-ID galleries of up to ~100k items are searched exactly in seconds
(a [Q, G] inner product), and exact search is what evaluation needs; above that an IVF
index with ``nlist ~ 4 sqrt(N)`` lists and ``nprobe = nlist / 8`` keeps recall high on
embedding clusters (tested) at a fraction of the cost.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reid_ray import io as rio
from reid_ray.errors import ConfigError, OutputError

logger = logging.getLogger(__name__)

DEFAULT_K = 100
DEFAULT_EXACT_THRESHOLD = 100_000
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"


@dataclass
class GalleryIndex:
    """A FAISS index plus the gallery ids of its rows and how it was built."""

    index: Any
    ids: np.ndarray
    kind: str  # "flat" | "ivf"
    dim: int
    key: str = ""
    nlist: int = 0
    nprobe: int = 0
    on_gpu: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n": len(self.ids),
            "dim": self.dim,
            "key": self.key,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "on_gpu": self.on_gpu,
            **self.meta,
        }


def _as_matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ConfigError(f"{name} must have shape [N, D], got {x.shape}")
    if dim is not None and x.shape[1] != dim and len(x):
        raise ConfigError(f"{name} have dimension {x.shape[1]}, the index {dim}")
    if len(x) and not np.isfinite(x).all():
        raise ConfigError(f"{name} contain non-finite values")
    return x


def gpu_count() -> int:
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _to_gpu(index):
    import faiss

    return faiss.index_cpu_to_all_gpus(index)


def default_nlist(n: int) -> int:
    """~4 sqrt(N) lists, with at least 39 training points per list (FAISS's minimum)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def build_index(
    embeddings: np.ndarray,
    ids,
    *,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    nlist: int = 0,
    nprobe: int = 0,
    use_gpu: bool | str = "auto",
    key: str = "",
    seed: int = 0,
) -> GalleryIndex:
    """Index ``embeddings`` [N, D] (L2-normalised float32) whose rows are ``ids`` [N].

    Exact inner product when ``N <= exact_threshold``, IVF-Flat otherwise (``nlist`` lists,
    0: automatic; ``nprobe`` lists visited per query, 0: ``nlist / 8``). ``use_gpu``:
    "auto" (when FAISS sees GPUs), True or False.
    """
    import faiss

    x = _as_matrix(embeddings, "embeddings")
    ids = np.asarray([str(i) for i in ids], dtype=object)
    if len(ids) != len(x):
        raise ConfigError(f"{len(ids)} ids for {len(x)} embeddings")
    if len(x) == 0:
        raise ConfigError("cannot index an empty gallery")
    if len(set(ids.tolist())) != len(ids):
        raise ConfigError("gallery ids must be unique")
    n, d = x.shape
    gpus = gpu_count()
    if use_gpu is True and gpus == 0:
        raise ConfigError("GPU index requested but FAISS sees no GPU (faiss-cpu installed?)")
    on_gpu = gpus > 0 and use_gpu in (True, "auto")
    if n <= exact_threshold:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        kind, nlist_used, nprobe_used = "flat", 0, 0
    else:
        nlist_used = int(nlist or default_nlist(n))
        if nlist_used > n:
            raise ConfigError(f"nlist {nlist_used} exceeds the {n} gallery items")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist_used, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        n_train = min(n, nlist_used * 256)
        train = x[np.sort(rng.choice(n, n_train, replace=False))] if n_train < n else x
        index.train(train)
        index.add(x)
        nprobe_used = int(nprobe or max(1, math.ceil(nlist_used / 8)))
        index.nprobe = min(nprobe_used, nlist_used)
        kind = "ivf"
    if on_gpu:
        index = _to_gpu(index)
    logger.info("built %s index of %d x %d%s", kind, n, d, " on GPU" if on_gpu else "")
    return GalleryIndex(index, ids, kind, d, key, nlist_used, nprobe_used, on_gpu)


def search(
    index: GalleryIndex,
    queries: np.ndarray,
    k: int = DEFAULT_K,
    *,
    query_ids=None,
    exclude_self: bool = False,
    chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery items per query row.

    Returns ``scores`` [Q, k] float32 (descending; ``-inf`` pads when fewer exist) and
    ``ids`` [Q, k] object (gallery ids; ``None`` pads). With ``exclude_self`` (needs
    ``query_ids``), a gallery item with the query's own id is skipped, e.g. to search the
    gallery against itself (leave-one-out).
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    q = _as_matrix(queries, "queries", index.dim)
    if exclude_self and query_ids is None:
        raise ConfigError("exclude_self needs query_ids")
    qids = None if query_ids is None else np.asarray([str(i) for i in query_ids], dtype=object)
    if qids is not None and len(qids) != len(q):
        raise ConfigError(f"{len(qids)} query ids for {len(q)} queries")
    n_q = len(q)
    out_scores = np.full((n_q, k), -np.inf, dtype=np.float32)
    out_ids = np.full((n_q, k), None, dtype=object)
    if n_q == 0:
        return out_scores, out_ids
    k_search = min(k + (1 if exclude_self else 0), len(index.ids))
    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        scores, pos = index.index.search(q[start:stop], k_search)
        found = pos >= 0
        gallery_ids = np.where(found, index.ids[np.clip(pos, 0, None)], None)
        if exclude_self:
            self_hit = gallery_ids == qids[start:stop, None]
            keep = found & ~self_hit
        else:
            keep = found
        if keep.all() and k_search <= k:
            out_scores[start:stop, :k_search] = scores
            out_ids[start:stop, :k_search] = gallery_ids
            continue
        for r in range(stop - start):
            cols = np.flatnonzero(keep[r])[:k]
            out_scores[start + r, : len(cols)] = scores[r, cols]
            out_ids[start + r, : len(cols)] = gallery_ids[r, cols]
    return out_scores, out_ids


def save_index(index: GalleryIndex, folder: str, meta: dict[str, Any] | None = None) -> None:
    """Write ``folder/index.faiss``, ``ids.parquet`` and ``index.json`` (last)."""
    import faiss
    import pyarrow as pa

    cpu_index = faiss.index_gpu_to_cpu(index.index) if index.on_gpu else index.index
    data = faiss.serialize_index(cpu_index)
    rio.makedirs(folder)
    rio.remove(rio.join(folder, META_FILE))
    rio.write_bytes_atomic(rio.join(folder, INDEX_FILE), np.asarray(data).tobytes())
    rio.write_table_atomic(
        rio.join(folder, IDS_FILE),
        pa.table({"gallery_id": pa.array(index.ids.tolist(), pa.string())}),
    )
    rio.write_json_atomic(rio.join(folder, META_FILE), {**index.describe(), **(meta or {})})


def read_index_meta(folder: str) -> dict:
    """An index folder's metadata (kind, n, dim, key ...) without loading the index."""
    meta_path = rio.join(folder, META_FILE)
    if not rio.exists(meta_path):
        raise OutputError(f"no index in {folder} (no {META_FILE}): run `reid-ray index` first")
    return rio.read_json(meta_path)


def load_index(folder: str, *, use_gpu: bool | str = "auto") -> GalleryIndex:
    """Read an index folder written by ``save_index`` (or ``reid-ray index``)."""
    import faiss

    from reid_ray.parts import read_part

    meta = read_index_meta(folder)
    raw = np.frombuffer(rio.read_bytes(rio.join(folder, INDEX_FILE)), dtype=np.uint8)
    index = faiss.deserialize_index(raw)
    ids = np.asarray(read_part(rio.join(folder, IDS_FILE)).column("gallery_id").to_pylist(), object)
    if index.ntotal != len(ids):
        raise OutputError(f"{folder}: index holds {index.ntotal} vectors but {len(ids)} ids")
    nprobe = int(meta.get("nprobe") or 0)
    if nprobe and hasattr(index, "nprobe"):
        index.nprobe = nprobe
    on_gpu = gpu_count() > 0 and use_gpu in (True, "auto")
    if on_gpu:
        index = _to_gpu(index)
    extra = {
        k: v
        for k, v in meta.items()
        if k not in ("kind", "n", "dim", "key", "nlist", "nprobe", "on_gpu")
    }
    return GalleryIndex(
        index,
        ids,
        meta["kind"],
        int(meta["dim"]),
        meta.get("key", ""),
        int(meta.get("nlist") or 0),
        nprobe,
        on_gpu,
        extra,
    )
