"""Gallery search on a Ray actor pool: embeddings parts -> top candidate identities.

Each ``Searcher`` actor loads the gallery version's FAISS index and its image -> identity
map once, then maps batches of query embeddings to their best ``candidates`` identities
(an identity scores its best image among the ``k`` nearest). The driver only receives
those few ids and scores per image, never the vectors.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray import parts as rparts

logger = logging.getLogger(__name__)

CANDIDATES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("cand_identities", pa.list_(pa.string())),
        ("cand_scores", pa.list_(pa.float32())),
        ("cand_images", pa.list_(pa.string())),
    ]
)


def fold_identities(
    scores: np.ndarray, images: np.ndarray, lookup: dict[str, str], n: int
) -> tuple[list[str], list[float], list[str]]:
    """One query's neighbours (descending) -> its ``n`` best identities with their best
    score and image."""
    out_ids: list[str] = []
    out_scores: list[float] = []
    out_images: list[str] = []
    seen: set[str] = set()
    for s, g in zip(scores, images, strict=True):
        if g is None or not math.isfinite(float(s)):
            continue
        identity = lookup[g]
        if identity in seen:
            continue
        seen.add(identity)
        out_ids.append(identity)
        out_scores.append(float(s))
        out_images.append(g)
        if len(out_ids) == n:
            break
    return out_ids, out_scores, out_images


class Searcher:
    """A Ray Data actor: loads one gallery version once, searches every batch it gets."""

    def __init__(self, gallery: str, version: str, k: int, candidates: int):
        from reid_ray.gallery.store import open_version, read_table
        from reid_ray.index import load_index
        from reid_ray.runtime import hide_unassigned_gpus

        hide_unassigned_gpus()  # a CPU searcher on a GPU node must not see its GPUs

        v = open_version(gallery, version)
        self.index = load_index(v.index_folder())
        table = read_table(v, ["image_id", "identity"])
        self.lookup = dict(
            zip(
                table.column("image_id").to_pylist(),
                table.column("identity").to_pylist(),
                strict=True,
            )
        )
        self.k, self.candidates = int(k), int(candidates)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reid_ray.embed.store import table_to_matrix
        from reid_ray.index import search

        ids = batch.column("image_id").to_pylist()
        if not ids:
            return CANDIDATES_SCHEMA.empty_table()
        scores, images = search(self.index, table_to_matrix(batch), min(self.k, len(self.lookup)))
        rows = [
            fold_identities(scores[i], images[i], self.lookup, self.candidates)
            for i in range(len(ids))
        ]
        return pa.table(
            {
                "image_id": pa.array(ids, pa.string()),
                "cand_identities": pa.array([r[0] for r in rows], pa.list_(pa.string())),
                "cand_scores": pa.array([r[1] for r in rows], pa.list_(pa.float32())),
                "cand_images": pa.array([r[2] for r in rows], pa.list_(pa.string())),
            },
            schema=CANDIDATES_SCHEMA,
        )


def search_parts(
    embed_dir: str,
    gallery: str,
    version: str,
    *,
    k: int,
    candidates: int,
    actors: int,
    batch_size: int,
) -> pa.Table:
    """Candidates of every embedding in ``embed_dir/embeddings`` (an embed output)."""
    import ray.data

    from reid_ray.runtime import cluster_view, plan_pool

    files = rparts.list_parts(rio.join(embed_dir, "embeddings"))
    if not files:
        return CANDIDATES_SCHEMA.empty_table()
    fs, _ = rio.arrow_filesystem(files[0])
    ds = ray.data.read_parquet(
        [rio.arrow_filesystem(f)[1] for f in files],
        filesystem=fs,
        columns=["image_id", "embedding"],
    )
    view = cluster_view()
    plan = plan_pool(
        view,
        device="cpu",
        actors=actors or max(1, min(int(view.cpus // 8), len(files))),  # sized by the queries
        cpus_per_actor=0.5 if view.cpus < 8 else 1.0,
    )
    ds = ds.map_batches(
        Searcher,
        fn_constructor_kwargs=dict(gallery=gallery, version=version, k=k, candidates=candidates),
        batch_size=batch_size,
        batch_format="pyarrow",
        **plan.map_batches_kwargs(),
    )
    tables = [
        pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")
    ]
    tables = [t.cast(CANDIDATES_SCHEMA) for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else CANDIDATES_SCHEMA.empty_table()
