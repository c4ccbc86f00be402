"""Distributed embedding: manifest -> read/decode/crop/resize on CPU workers -> Embedder
actor pool -> Parquet parts, streamed; resumable.

The Ray wiring is thin: ``reid_ray.data.pipeline.load_batch`` decodes on CPU workers
(fractional-CPU decoder actors by default, Ray tasks on request: see ``build_dataset``),
``Dataset.map_batches(Embedder, compute=ActorPoolStrategy(...))`` embeds, and the driver
consumes the stream batch by batch into a ``PartWriter`` (small vectors only; images never
reach the driver and memory does not grow with the number of images). On a rerun the ids
already embedded with the same model are skipped; rows that failed before are retried.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from reid_ray import io as rio
from reid_ray import parts
from reid_ray.data.manifest import Manifest
from reid_ray.embed.config import EmbedConfig, ResourcePlan, plan_resources
from reid_ray.embed.store import EMBEDDINGS_DIR, ERRORS_DIR, PartWriter, scan_existing
from reid_ray.errors import ConfigError, OutputError

logger = logging.getLogger(__name__)


@dataclass
class EmbedSummary:
    """What one embed run did (also written, with more detail, to ``OUT/manifest.json``)."""

    out: str
    model_ref: str
    description: str
    fingerprint: str
    key: str
    embedding_dim: int
    n_manifest_rows: int = 0
    n_requested: int = 0
    n_already_embedded: int = 0
    n_embedded: int = 0
    n_errors: int = 0
    n_manifest_errors: int = 0
    n_total_embedded: int = 0
    seconds: float = 0.0
    pipeline_seconds: float = 0.0
    images_per_second: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)
    error_examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def embed(
    manifest_path: str,
    model_ref: str,
    out: str,
    cfg: EmbedConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    command: str | None = None,
) -> EmbedSummary:
    """Embed every row of the manifest at ``manifest_path`` (see ``embed_manifest``)."""
    from reid_ray.data import read_manifest

    manifest = read_manifest(manifest_path)
    return embed_manifest(
        manifest, model_ref, out, cfg, overwrite=overwrite, progress=progress, command=command
    )


def _check_existing(out: str, key: str, model_ref: str, overwrite: bool) -> set[str]:
    """Ids already embedded with ``key``; fails on another model's output unless overwrite."""
    existing = scan_existing(out)
    others = existing.keys - {key}
    if others and not overwrite:
        described = ""
        try:
            described = f" (model {parts.read_run_record(out)['model']['ref']!r})"
        except (KeyError, TypeError, ValueError):
            described = ""
        raise OutputError(
            f"{out} already holds embeddings of another model{described}, fingerprint "
            f"{', '.join(sorted(others))}; this run's is {key}. Use another --out, or "
            "--overwrite to replace them."
        )
    if others:
        logger.warning(
            "overwrite: removing %d embedding part(s) of another model in %s", existing.n_parts, out
        )
        rio.remove(rio.join(out, EMBEDDINGS_DIR), recursive=True)
        return set()
    return existing.ids(key)


def _start_run(out: str) -> None:
    """Mark ``out`` incomplete and clear what is recomputed: manifest.json goes first
    (a crash never leaves a complete-looking output), then old error parts (every row not
    embedded is retried and its error, if any, written again) and temporary leftovers."""
    rio.makedirs(out)
    rio.remove(rio.join(out, parts.MANIFEST_FILE))
    for part in parts.list_parts(rio.join(out, ERRORS_DIR)):
        rio.remove(part)
    for folder in (rio.join(out, EMBEDDINGS_DIR), rio.join(out, ERRORS_DIR)):
        n = parts.remove_temporary(folder)
        if n:
            logger.info("removed %d temporary file(s) of an interrupted run in %s", n, folder)


class Decoder:
    """``load_batch`` as a callable class, so decoding runs on long-lived actors."""

    def __init__(self, size, resize_mode: str = "resize", interpolation: str = "bilinear"):
        self.kwargs = dict(size=tuple(size), resize_mode=resize_mode, interpolation=interpolation)

    def __call__(self, batch):
        from reid_ray.data.pipeline import load_batch

        return load_batch(batch, **self.kwargs)


def build_dataset(
    table: pa.Table,
    model_ref: str,
    preprocess,
    plan: ResourcePlan,
    *,
    image_size: int | None,
    flip: bool,
    expected_key: str | None,
):
    """The lazy Ray Dataset: manifest rows -> decoded images -> Embedder outputs.

    Decoding (``reid_ray.data.pipeline.load_batch``) runs on long-lived CPU workers: an
    actor pool of ``plan.decode_tasks`` decoders (``plan.decode_mode == "actors"``, the
    default) or Ray tasks (``"tasks"``). Why actors: each Ray task needs a worker lease,
    and when a task waits on a slow consumer or the machine is busy Ray starts yet another
    worker process for the next one; measured on 2 cores under load, a 2000-image run
    started 13-18 worker processes at ~1.2 CPU-s of Python start-up each, about a fifth of
    the pipeline's CPU. A decoder actor is started once.
    """
    import ray.data

    from reid_ray.data.pipeline import load_batch, manifest_dataset
    from reid_ray.embed.embedder import Embedder

    rows_per_block = max(plan.decode_batch_size, 16)
    ds = manifest_dataset(table, rows_per_block=rows_per_block)
    n_decoders = max(1, min(plan.decode_tasks, math.ceil(table.num_rows / rows_per_block)))
    decode_kwargs = dict(
        size=tuple(preprocess.input_size),
        resize_mode=preprocess.resize_mode,
        interpolation=preprocess.interpolation,
    )
    if plan.decode_mode == "actors":
        ds = ds.map_batches(
            Decoder,
            fn_constructor_kwargs=decode_kwargs,
            batch_size=plan.decode_batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_decoders),
            num_cpus=plan.decode_cpus,
        )
    else:
        ds = ds.map_batches(
            load_batch,
            fn_kwargs=decode_kwargs,
            batch_size=plan.decode_batch_size,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=n_decoders),
            num_cpus=plan.decode_cpus,
        )
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(
            model_ref=model_ref,
            image_size=image_size,
            flip=flip,
            device=plan.device,
            precision=plan.precision,
            threads=plan.threads,
            expected_key=expected_key,
        ),
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor or None,
        batch_size=plan.batch_size,
        batch_format="numpy",
        zero_copy_batch=True,
    )


def embed_manifest(
    manifest: Manifest,
    model_ref: str,
    out: str,
    cfg: EmbedConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    command: str | None = None,
) -> EmbedSummary:
    """Embed the rows of ``manifest`` with ``model_ref`` into ``out``, resuming.

    Ids already embedded in ``out`` with the same model (and flip setting) are skipped; a
    folder holding another model's embeddings raises ``OutputError`` unless ``overwrite``.
    Bad rows (the manifest's own rejects and every image that cannot be read or decoded)
    go to ``out/errors``. ``progress(done, total)`` is called as batches finish.
    ``out/manifest.json`` is written last: its presence means the run completed.
    """
    from reid_ray.embed.embedder import embedding_key
    from reid_ray.models import load
    from reid_ray.runtime import cluster_view, init_ray

    cfg = cfg or EmbedConfig()
    if not isinstance(cfg, EmbedConfig):
        raise ConfigError(f"cfg must be an EmbedConfig, got {type(cfg).__name__}")
    t_start = time.perf_counter()
    loaded = load(model_ref, image_size=cfg.image_size)
    key = embedding_key(loaded.fingerprint, cfg.flip)
    preprocess, description, dim = loaded.preprocess, loaded.description, loaded.embedding_dim
    fingerprint = loaded.fingerprint
    del loaded  # the actors load their own copy

    done = _check_existing(out, key, model_ref, overwrite)
    _start_run(out)
    table = manifest.table
    if done:
        import pyarrow.compute as pc

        mask = pc.invert(pc.is_in(table["image_id"], value_set=pa.array(sorted(done), pa.string())))
        todo = table.filter(mask)
    else:
        todo = table
    n_already = table.num_rows - todo.num_rows
    logger.info(
        "embed %s -> %s: %d rows, %d already embedded, %d to do",
        model_ref,
        out,
        table.num_rows,
        n_already,
        todo.num_rows,
    )

    writer = PartWriter(out, key, rows_per_part=cfg.rows_per_part, flush_seconds=cfg.flush_seconds)
    writer.add_errors(manifest.errors)
    plan: ResourcePlan | None = None
    t_pipe = time.perf_counter()
    n_seen = 0
    error_examples: list[dict] = []
    if todo.num_rows:
        init_ray()
        plan = plan_resources(cfg, cluster_view())
        logger.debug("plan: %s", plan.to_dict())
        ds = build_dataset(
            todo,
            model_ref,
            preprocess,
            plan,
            image_size=cfg.image_size,
            flip=cfg.flip,
            expected_key=key,
        )
        if progress:
            progress(0, todo.num_rows)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                n_ok, n_bad = writer.add(batch)
                if n_bad and len(error_examples) < 5:
                    for i, e in enumerate(batch["error"]):
                        if e and len(error_examples) < 5:
                            error_examples.append(
                                {"image_id": str(batch["image_id"][i]), "reason": str(e)}
                            )
                n_seen += n_ok + n_bad
                if progress:
                    progress(n_seen, todo.num_rows)
        except BaseException:
            # keep the finished rows (complete parts) so a rerun resumes after them
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the original error matters more
                logger.exception("could not write the buffered rows of the failed run")
            raise
    writer.close()
    pipeline_seconds = time.perf_counter() - t_pipe
    if n_seen != todo.num_rows:
        raise OutputError(
            f"the pipeline returned {n_seen} rows for {todo.num_rows} inputs; output incomplete"
        )
    n_run_errors = writer.n_errors - manifest.errors.num_rows
    summary = EmbedSummary(
        out=out,
        model_ref=model_ref,
        description=description,
        fingerprint=fingerprint,
        key=key,
        embedding_dim=int(dim),
        n_manifest_rows=table.num_rows,
        n_requested=table.num_rows,
        n_already_embedded=n_already,
        n_embedded=writer.n_embedded,
        n_errors=n_run_errors,
        n_manifest_errors=manifest.errors.num_rows,
        n_total_embedded=len(done) + writer.n_embedded,
        seconds=time.perf_counter() - t_start,
        pipeline_seconds=pipeline_seconds,
        images_per_second=(n_seen / pipeline_seconds) if n_seen and pipeline_seconds > 0 else 0.0,
        plan=plan.to_dict() if plan else {},
        error_examples=error_examples,
    )
    parts.write_run_record(
        out,
        command or "embed",
        config=cfg,
        counts={
            "manifest_rows": table.num_rows,
            "manifest_errors": manifest.errors.num_rows,
            "already_embedded": n_already,
            "embedded": writer.n_embedded,
            "errors": n_run_errors,
            "total_embedded": summary.n_total_embedded,
        },
        timings={
            "total_seconds": summary.seconds,
            "pipeline_seconds": pipeline_seconds,
            "images_per_second": summary.images_per_second,
            "images_per_second_measures": "rows through the whole pipeline (read, decode, "
            "resize, inference, write) divided by the pipeline's wall time, this run",
        },
        source=manifest.source,
        plan=summary.plan,
        model={
            "ref": model_ref,
            "description": description,
            "fingerprint": fingerprint,
            "key": key,
            "embedding_dim": int(dim),
            "preprocess": preprocess.to_dict(),
        },
        layout={
            "embeddings": f"{EMBEDDINGS_DIR}/part-*.parquet (image_id, embedding "
            "list<float32> L2-normalised, model = embedding key)",
            "errors": f"{ERRORS_DIR}/part-*.parquet (image_id, path, stage, reason)",
        },
        warnings=list(manifest.warnings),
    )
    logger.info(
        "embedded %d, errors %d, %.1f images/s",
        writer.n_embedded,
        n_run_errors,
        summary.images_per_second,
    )
    return summary
