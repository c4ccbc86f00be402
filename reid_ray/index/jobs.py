"""The ``index`` and ``search`` jobs: embeddings folder -> index folder -> candidates.

``search_embeddings`` streams: query embeddings are read in record batches and every
batch's candidates are written as a part by the process that searched it, so memory holds
the gallery index and one batch, never all queries. With ``actors`` > 0 the query batches
are a Ray Dataset searched by an actor pool, each actor holding a replica of the index
(``QuerySearcher``: the same kernel runs in-process when ``actors`` is 0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from reid_ray import io as rio
from reid_ray import parts
from reid_ray.errors import ConfigError, OutputError
from reid_ray.index.candidates import CANDIDATES_DIR, candidates_table
from reid_ray.index.faiss_index import (
    DEFAULT_EXACT_THRESHOLD,
    DEFAULT_K,
    build_index,
    gpu_count,
    load_index,
    read_index_meta,
    save_index,
    search,
)

logger = logging.getLogger(__name__)


IDENTITIES_FILE = "identities.parquet"


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
    on_ray: bool = False,
    command: str | None = None,
) -> IndexSummary:
    """Build and save the index of the embeddings in ``embeddings`` (an embed output),
    restricted to the manifest rows of ``splits`` when a manifest is given.

    ``on_ray``: build it in a Ray task (with a GPU when ``use_gpu`` asks for one or, on
    ``auto``, when the cluster has one), so that the calling process, a job's driver, never
    holds the gallery's vectors; only the summary comes back.
    """
    from reid_ray.embed.store import read_embeddings  # embedding-specific reader

    if on_ray:
        import ray

        from reid_ray.runtime import (
            cluster_view,
            data_reserve,
            get_result,
            init_ray,
            require_shared_output,
        )

        init_ray()
        require_shared_output(out, "index --out")
        view = cluster_view()
        # a GPU only when asked for, or on auto where faiss has GPU support and the cluster
        # GPUs: faiss-cpu on a GPU would hold it idle; the CPUs of one node, all threads
        gpus = use_gpu is True or (use_gpu == "auto" and view.gpus >= 1 and gpu_count() > 0)
        cpus = max(
            1, int((view.node_cpus or view.cpus) - data_reserve(view.node_cpus or view.cpus))
        )
        task = ray.remote(num_cpus=cpus, num_gpus=1 if gpus else 0)(_index_task)
        settings = dict(manifest=manifest, split=split, splits=tuple(splits),
                        exact_threshold=exact_threshold, nlist=nlist, nprobe=nprobe,
                        use_gpu=use_gpu if gpus else False, command=command)  # fmt: skip
        return get_result(task.remote(cpus, embeddings, out, **settings))
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
        **parts.run_record(command or "index"),
        "embeddings": embeddings,
        "manifest": manifest,
        "split": split,
        "splits": list(splits) if manifest else None,
        "n_missing": n_missing,
        "seconds": seconds,
    }
    save_index(gi, out, meta)
    if identities:
        parts.write_part(
            out,
            pa.table(
                {
                    "gallery_id": pa.array(gi.ids.tolist(), pa.string()),
                    "identity": pa.array([identities.get(i) for i in gi.ids.tolist()], pa.string()),
                }
            ),
            name=IDENTITIES_FILE,
        )
    return IndexSummary(out, gi.kind, len(gi), gi.dim, gi.key, n_missing, seconds, meta)


def _index_task(threads: int, embeddings: str, out: str, **settings: Any) -> IndexSummary:
    """``index_embeddings`` in a Ray task: faiss threads = the task's CPUs (Ray sets
    ``OMP_NUM_THREADS=1`` in workers), GPUs hidden unless Ray gave it one."""
    import faiss

    from reid_ray.runtime import hide_unassigned_gpus

    hide_unassigned_gpus()
    faiss.omp_set_num_threads(int(threads))
    return index_embeddings(embeddings, out, **settings)


@dataclass
class SearchSummary:
    out: str
    n_queries: int
    n_missing: int
    k: int
    n_candidates: int
    seconds: float
    queries_per_second: float
    actors: int = 0


class QuerySearcher:
    """Search batches of query embeddings against a replica of the index in ``index``;
    write each batch's candidates as a part of ``folder``; return only counts.

    Runs in the driver (``actors`` 0) or as a Ray Data actor (one index per actor).
    ``wanted``: the query ids to search (None: all). A batch from another model than the
    index raises ``ConfigError``.
    """

    def __init__(
        self,
        index: str,
        folder: str,
        *,
        k: int,
        exclude_self: bool = False,
        nprobe: int = 0,
        wanted: list[str] | None = None,
        threads: int = 0,
    ) -> None:
        from reid_ray.runtime import hide_unassigned_gpus

        hide_unassigned_gpus()  # a CPU searcher on a GPU node: faiss-gpu would take them all
        if threads:
            import faiss

            faiss.omp_set_num_threads(int(threads))
        self.gi = load_index(index)
        if nprobe and hasattr(self.gi.index, "nprobe"):
            self.gi.index.nprobe = int(nprobe)
        self.folder = folder
        self.k = int(k)
        self.exclude_self = bool(exclude_self)
        self.wanted = None if wanted is None else pa.array(sorted(set(wanted)), pa.string())
        self.run = parts.new_run_id()
        self.seq = 0

    def search_table(self, table: pa.Table) -> dict[str, Any]:
        """Candidates of ``table``'s rows (image_id, embedding, model) -> counts."""
        import pyarrow.compute as pc

        from reid_ray.embed.store import table_to_matrix

        keys = set(table.column("model").unique().to_pylist())
        if self.gi.key and keys - {self.gi.key}:
            raise ConfigError(
                f"query embeddings ({', '.join(sorted(keys))}) and index ({self.gi.key}) come "
                "from different models: embed the queries with the gallery's model"
            )
        if self.wanted is not None:
            table = table.filter(pc.is_in(table["image_id"], value_set=self.wanted))
        if table.num_rows == 0:
            return {"queries": 0, "candidates": 0, "ids": []}
        qids = table.column("image_id").to_pylist()
        scores, ids = search(
            self.gi, table_to_matrix(table), self.k, query_ids=qids, exclude_self=self.exclude_self
        )
        cand = candidates_table(qids, scores, ids)
        parts.write_part(self.folder, cand, run=self.run, seq=self.seq)
        self.seq += 1
        found = qids if self.wanted is not None else []
        return {"queries": len(qids), "candidates": cand.num_rows, "ids": found}

    def __call__(self, batch: pa.Table) -> pa.Table:
        counts = self.search_table(batch)
        return pa.table(
            {
                "queries": [counts["queries"]],
                "candidates": [counts["candidates"]],
                "ids": pa.array([counts["ids"]], pa.list_(pa.string())),
            }
        )


def _read_parts_batch(batch: dict) -> pa.Table:
    from reid_ray.embed.store import EMBEDDINGS_SCHEMA

    return pa.concat_tables(
        [parts.read_part(str(p)).cast(EMBEDDINGS_SCHEMA) for p in batch["path"]]
    )


def _query_dataset(embeddings: str, files: list[str], read_cpus: float):
    """The embedding parts as a Ray Dataset (workers read them; the driver never does).

    One read task per part at ``read_cpus`` (what the searcher pool leaves): Ray Data's
    ``read_parquet`` also runs a file-listing task at a whole CPU, which never schedules
    beside a pool holding all but half a CPU (it hung on 2 cores)."""
    import ray.data

    return ray.data.from_items([{"path": f} for f in files]).map_batches(
        _read_parts_batch, batch_size=1, batch_format="numpy", num_cpus=read_cpus
    )


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
    actors: int = 0,
    batch_size: int = 4096,
    command: str | None = None,
) -> SearchSummary:
    """Top-``k`` candidates of every query embedding (all of ``embeddings``, or the
    manifest rows of ``splits``) against the index folder ``index``; writes
    ``out/candidates/part-*.parquet`` and ``out/manifest.json`` (last).

    ``actors`` 0 searches in this process; more runs that many searcher actors on the Ray
    cluster, each with its own copy of the index, over query shards of ``batch_size``.
    """
    from reid_ray.embed.store import embeddings_dir

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if actors < 0 or batch_size < 1:
        raise ConfigError(f"actors must be >= 0 and batch_size >= 1, got {actors}, {batch_size}")
    t0 = time.perf_counter()
    meta = read_index_meta(index)  # fails fast on a missing index; the driver never loads it
    wanted: list[str] | None = None
    if manifest:
        wanted = sorted(set(select_rows(manifest, split, splits)["image_id"].to_pylist()))
    source = embeddings_dir(embeddings)
    files = parts.list_parts(source)
    if not files:
        raise OutputError(f"no embeddings under {embeddings}")
    folder = rio.join(out, CANDIDATES_DIR)
    rio.makedirs(out)
    rio.remove(rio.join(out, parts.MANIFEST_FILE))
    rio.remove(folder, recursive=True)
    searcher_kwargs = dict(k=k, exclude_self=exclude_self, nprobe=nprobe, wanted=wanted)
    n_queries = n_candidates = 0
    found: set[str] = set()
    if actors:
        from reid_ray.runtime import cluster_view, init_ray, plan_pool, require_shared_output

        init_ray()
        require_shared_output(out, "search --out")
        # never more searchers (each holding the index) than query parts to search
        pool = plan_pool(cluster_view(), device="cpu", actors=min(actors, len(files)))
        read_cpus = max(0.1, min(1.0, pool.free_cpus))
        counts = _query_dataset(embeddings, files, read_cpus).map_batches(
            QuerySearcher,
            fn_constructor_args=(index, folder),
            fn_constructor_kwargs=dict(searcher_kwargs, threads=pool.threads),
            batch_size=batch_size,
            batch_format="pyarrow",
            **pool.map_batches_kwargs(),
        )
        for batch in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
            n_queries += sum(batch.column("queries").to_pylist())
            n_candidates += sum(batch.column("candidates").to_pylist())
            for ids in batch.column("ids").to_pylist():
                found.update(ids)
    else:
        searcher = QuerySearcher(index, folder, **searcher_kwargs)
        for batch in parts.iter_batches(source, columns=None, batch_size=batch_size):
            c = searcher.search_table(pa.Table.from_batches([batch]))
            n_queries += c["queries"]
            n_candidates += c["candidates"]
            found.update(c["ids"])
    n_missing = len(set(wanted) - found) if wanted is not None else 0
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
        actors,
    )
    parts.write_run_record(
        out,
        command or "search",
        counts={"queries": n_queries, "missing_queries": n_missing, "candidates": n_candidates},
        timings={"seconds": seconds, "queries_per_second": summary.queries_per_second},
        index=index,
        index_kind=meta["kind"],
        gallery_size=int(meta["n"]),
        embeddings=embeddings,
        model_key=meta.get("key"),
        manifest=manifest,
        split=split,
        splits=list(splits) if manifest else None,
        k=k,
        exclude_self=exclude_self,
        actors=actors,
        layout=f"{CANDIDATES_DIR}/part-*.parquet (query_id, rank 1 = best, gallery_id, "
        "score = cosine similarity)",
    )
    return summary
