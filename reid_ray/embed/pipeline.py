"""Distributed embedding: manifest -> read/decode/crop/resize on CPU workers -> Embedder
actor pool -> Parquet parts written by workers, streamed; resumable.

The Ray wiring is thin: ``reid_ray.data.pipeline.decode_stage`` decodes on CPU workers
(fractional-CPU decoder actors by default, Ray tasks on request), ``Dataset.map_batches(
Embedder, compute=ActorPoolStrategy(...))`` embeds, and ``PartWriter`` actors write every
``rows_per_part`` rows as one atomic part. The driver only coordinates: it receives counts
and a few error examples (images and vectors never reach it; its memory does not grow
with the number of images). On a rerun the ids already embedded with the same model are
skipped; rows that failed before are retried.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray import parts
from reid_ray.data.manifest import Manifest
from reid_ray.embed.config import EmbedConfig, ResourcePlan, plan_resources
from reid_ray.embed.store import (
    EMBEDDINGS_DIR,
    ERRORS_DIR,
    scan_existing,
    write_batch_parts,
    write_errors,
)
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


def embed(manifest_path: str, *args: Any, **kwargs: Any) -> EmbedSummary:
    """Embed every row of the manifest at ``manifest_path``: :func:`embed_manifest` after
    reading (and validating) it."""
    from reid_ray.data import read_manifest

    return embed_manifest(read_manifest(manifest_path), *args, **kwargs)


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

    Decoding runs on ``plan.decode_tasks`` long-lived CPU decoders
    (``reid_ray.data.pipeline.decode_stage``: actors by default, Ray tasks with
    ``decode_mode: tasks``), reads ``plan.read_threads`` at a time, JPEGs decoded at a
    reduced scale when much larger than the model's input.
    """
    import ray.data

    from reid_ray.data.pipeline import decode_stage, manifest_dataset
    from reid_ray.embed.embedder import Embedder

    rows_per_block = max(plan.decode_batch_size, 16)
    ds = manifest_dataset(table, rows_per_block=rows_per_block)
    ds = decode_stage(
        ds,
        size=tuple(preprocess.input_size),
        resize_mode=preprocess.resize_mode,
        interpolation=preprocess.interpolation,
        batch_size=plan.decode_batch_size,
        num_cpus=plan.decode_cpus,
        # never more decoders than blocks: an idle actor still holds its CPU share
        workers=max(1, min(plan.decode_tasks, math.ceil(table.num_rows / rows_per_block))),
        mode=plan.decode_mode,
        read_threads=plan.read_threads,
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


class PartWriter:
    """Writes batches of Embedder output as Parquet parts, on a long-lived actor.

    Why an actor and not a task per batch: a Ray task that holds no CPU can land on a
    freshly started worker process, and each start costs about a second of Python
    imports; measured on 2 cores, write tasks took 7 CPU-seconds per 2,000 images. The
    actor starts once, beside the inference pool. It returns only counts and a few error
    examples, so the driver never holds vectors.
    """

    def __init__(self, out: str, key: str, run: str) -> None:
        self.out, self.key, self.run = out, key, run

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        n_ok, n_bad, error_rows = write_batch_parts(
            self.out, self.key, batch, run=f"{self.run}-{uuid.uuid4().hex[:8]}"
        )
        examples = [{"image_id": r["image_id"], "reason": r["reason"]} for r in error_rows[:5]]
        return {
            "embedded": np.array([n_ok]),
            "errors": np.array([n_bad]),
            "examples": np.array([json.dumps(examples)], dtype=object),
        }


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
    from reid_ray.runtime import (
        check_error_rate,
        cluster_view,
        init_ray,
        require_readable_inputs,
        require_shared_output,
    )

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

    # the driver writes only the manifest's own rejects; workers write everything else
    write_errors(out, manifest.errors)
    plan: ResourcePlan | None = None
    t_pipe = time.perf_counter()
    n_embedded = n_run_errors = 0
    error_examples: list[dict] = []
    if todo.num_rows:
        import ray.data

        init_ray()
        require_shared_output(out, "embed --out")
        require_readable_inputs(todo["path"].to_pylist()[:8], "images of the manifest")
        plan = plan_resources(cfg, cluster_view(), rows=todo.num_rows)
        logger.debug("plan: %s", plan.to_dict())
        ds = build_dataset(
            todo,
            model_ref,
            preprocess,
            plan,
            image_size=cfg.image_size,
            flip=cfg.flip,
            expected_key=key,
        ).map_batches(
            PartWriter,
            fn_constructor_kwargs=dict(out=out, key=key, run=parts.new_run_id()),
            # parts of rows_per_part rows, smaller on small runs so that progress (one
            # update per part written) still moves about 20 times in a run
            batch_size=min(cfg.rows_per_part, max(16, math.ceil(todo.num_rows / 20))),
            batch_format="numpy",
            # writing a part is I/O: no CPU reserved, so it never waits behind the pool
            num_cpus=0,
            compute=ray.data.ActorPoolStrategy(size=max(1, plan.actors)),
        )
        if progress:
            progress(0, todo.num_rows)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            n_embedded += int(batch["embedded"].sum())
            n_run_errors += int(batch["errors"].sum())
            for text in batch["examples"]:
                error_examples.extend(json.loads(text)[: 5 - len(error_examples)])
            if progress:
                progress(n_embedded + n_run_errors, todo.num_rows)
    n_seen = n_embedded + n_run_errors
    pipeline_seconds = time.perf_counter() - t_pipe
    if n_seen != todo.num_rows:
        raise OutputError(
            f"the pipeline returned {n_seen} rows for {todo.num_rows} inputs; output incomplete"
        )
    # a pass over unreadable inputs fails (manifest.json unwritten: the output is not
    # complete), it does not "succeed" with its rows in errors; a rerun keeps what finished
    n_bad = n_run_errors + manifest.errors.num_rows
    check_error_rate(
        n_bad,
        table.num_rows + manifest.errors.num_rows,  # rows embedded before count as fine
        "rows",
        cfg.max_error_rate,
        where=rio.join(out, ERRORS_DIR)
        + (f" (e.g. {error_examples[0]})" if error_examples else ""),
    )
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
        n_embedded=n_embedded,
        n_errors=n_run_errors,
        n_manifest_errors=manifest.errors.num_rows,
        n_total_embedded=len(done) + n_embedded,
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
            "embedded": n_embedded,
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
        n_embedded,
        n_run_errors,
        summary.images_per_second,
    )
    return summary
