"""The ``index`` and ``search`` jobs: embeddings folder -> index folder -> candidates.

``search_embeddings`` streams: it reads the query embeddings one Parquet part at a time and
writes one candidates part per input part, so only the gallery index is held in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from reid_ray import io as rio
from reid_ray.errors import ConfigError, OutputError
from reid_ray.index.candidates import CANDIDATES_DIR, candidates_table
from reid_ray.index.faiss_index import (
    DEFAULT_EXACT_THRESHOLD,
    DEFAULT_K,
    build_index,
    load_index,
    save_index,
    search,
)

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


def select_rows(manifest_path: str, split_path: str | None, splits: Sequence[str]) -> pa.Table:
    """Manifest rows to use: those whose split is in ``splits`` when the manifest (or the
    split file) assigns splits, else every row."""
    from reid_ray.data import read_manifest

    manifest = read_manifest(manifest_path, split_file=split_path)
    has_splits = manifest.table["split"].null_count < manifest.table.num_rows
    if split_path or has_splits:
        selected = manifest.select_splits(*splits).table
        if selected.num_rows == 0:
            raise ConfigError(
                f"no rows of split {', '.join(splits)} in {manifest_path}"
                + (f" with split file {split_path}" if split_path else "")
            )
        return selected
    return manifest.table


@dataclass
class IndexSummary:
    out: str
    kind: str
    n: int
    dim: int
    key: str
    n_missing: int
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


def index_embeddings(
    embeddings: str,
    out: str,
    *,
    manifest: str | None = None,
    split: str | None = None,
    splits: Sequence[str] = ("gallery",),
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    nlist: int = 0,
    nprobe: int = 0,
    use_gpu: bool | str = "auto",
    command: str | None = None,
) -> IndexSummary:
    """Build and save the index of the embeddings in ``embeddings`` (an embed output),
    restricted to the manifest rows of ``splits`` when a manifest is given."""
    from reid_ray.embed.store import read_embeddings

    t0 = time.perf_counter()
    identities: dict[str, str | None] = {}
    wanted = None
    if manifest:
        rows = select_rows(manifest, split, splits)
        wanted = rows["image_id"].to_pylist()
        identities = dict(zip(wanted, rows["identity"].to_pylist(), strict=True))
    emb = read_embeddings(embeddings, ids=wanted)
    n_missing = (len(wanted) - len(emb)) if wanted is not None else 0
    if n_missing:
        logger.warning("%d gallery row(s) have no embedding (see the embed errors)", n_missing)
    if len(emb) == 0:
        raise ConfigError(f"no embeddings to index in {embeddings} for the selected rows")
    gi = build_index(
        emb.matrix,
        emb.ids,
        exact_threshold=exact_threshold,
        nlist=nlist,
        nprobe=nprobe,
        use_gpu=use_gpu,
        key=emb.key,
    )
    seconds = time.perf_counter() - t0
    meta = {
        "command": command or "index",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "embeddings": embeddings,
        "manifest": manifest,
        "split": split,
        "splits": list(splits) if manifest else None,
        "n_missing": n_missing,
        "seconds": seconds,
    }
    save_index(gi, out, meta)
    if identities:
        rio.write_table_atomic(
            rio.join(out, "identities.parquet"),
            pa.table(
                {
                    "gallery_id": pa.array(gi.ids.tolist(), pa.string()),
                    "identity": pa.array([identities.get(i) for i in gi.ids.tolist()], pa.string()),
                }
            ),
        )
    return IndexSummary(out, gi.kind, len(gi), gi.dim, gi.key, n_missing, seconds, meta)


@dataclass
class SearchSummary:
    out: str
    n_queries: int
    n_missing: int
    k: int
    n_candidates: int
    seconds: float
    queries_per_second: float


def search_embeddings(
    index: str,
    embeddings: str,
    out: str,
    *,
    manifest: str | None = None,
    split: str | None = None,
    splits: Sequence[str] = ("query", "query_unknown"),
    k: int = DEFAULT_K,
    exclude_self: bool = False,
    nprobe: int = 0,
    command: str | None = None,
) -> SearchSummary:
    """Top-``k`` candidates of every query embedding (all of ``embeddings``, or the
    manifest rows of ``splits``) against the index folder ``index``; writes
    ``out/candidates/part-*.parquet`` and ``out/manifest.json`` (last)."""
    from reid_ray.embed.store import iter_parts, table_to_matrix

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    t0 = time.perf_counter()
    gi = load_index(index)
    if nprobe and hasattr(gi.index, "nprobe"):
        gi.index.nprobe = int(nprobe)
    wanted: set[str] | None = None
    wanted_array = None
    if manifest:
        wanted = set(select_rows(manifest, split, splits)["image_id"].to_pylist())
        wanted_array = pa.array(sorted(wanted), pa.string())
    folder = rio.join(out, CANDIDATES_DIR)
    rio.makedirs(out)
    rio.remove(rio.join(out, MANIFEST_FILE))
    rio.remove(folder, recursive=True)
    n_queries = n_candidates = n_parts = 0
    found: set[str] = set()
    for part, table in iter_parts(embeddings):
        n_parts += 1
        keys = set(table.column("model").unique().to_pylist())
        if gi.key and keys - {gi.key}:
            raise ConfigError(
                f"query embeddings ({', '.join(sorted(keys))}) and index ({gi.key}) come from "
                "different models: embed the queries with the gallery's model"
            )
        if wanted is not None:
            import pyarrow.compute as pc

            table = table.filter(pc.is_in(table["image_id"], value_set=wanted_array))
        if table.num_rows == 0:
            continue
        qids = table.column("image_id").to_pylist()
        found.update(qids)
        scores, ids = search(
            gi, table_to_matrix(table), k, query_ids=qids, exclude_self=exclude_self
        )
        cand = candidates_table(qids, scores, ids)
        name = part.rsplit("/", 1)[-1]
        rio.write_table_atomic(rio.join(folder, name), cand)
        n_queries += len(qids)
        n_candidates += cand.num_rows
    if n_parts == 0:
        raise OutputError(f"no embeddings under {embeddings}")
    n_missing = len(wanted - found) if wanted is not None else 0
    if n_missing:
        logger.warning("%d query row(s) have no embedding (see the embed errors)", n_missing)
    seconds = time.perf_counter() - t0
    summary = SearchSummary(
        out,
        n_queries,
        n_missing,
        k,
        n_candidates,
        seconds,
        n_queries / seconds if seconds > 0 else 0.0,
    )
    rio.write_json_atomic(
        rio.join(out, MANIFEST_FILE),
        {
            "command": command or "search",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "index": index,
            "index_kind": gi.kind,
            "gallery_size": len(gi),
            "embeddings": embeddings,
            "model_key": gi.key,
            "manifest": manifest,
            "split": split,
            "splits": list(splits) if manifest else None,
            "k": k,
            "exclude_self": exclude_self,
            "counts": {
                "queries": n_queries,
                "missing_queries": n_missing,
                "candidates": n_candidates,
            },
            "timings": {"seconds": seconds, "queries_per_second": summary.queries_per_second},
            "layout": f"{CANDIDATES_DIR}/part-*.parquet (query_id, rank 1 = best, gallery_id, "
            "score = cosine similarity)",
        },
    )
    return summary
