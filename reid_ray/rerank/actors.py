"""The re-ranking actors: features once per image into the cache, pairs through a matcher.

Both load their model once in ``__init__`` (one per actor) and map one Ray Data batch in
``__call__``; torch/OpenCV threads follow the actor's CPU share (``runtime.set_threads``).
Each names its ``STAGE``; :func:`plan_stage_pool` sizes its pool: SIFT and the classical
matcher on CPU pools (their actors see no GPU), DISK/ALIKED and LightGlue on the device the
config asks for.
``MatchActor`` writes each batch's scores as one atomic part (``reid_ray.parts``) with the
same name in ``pairs/`` and ``errors/``, so an interrupted run keeps every finished batch.
A bad image or a failed match is recorded with its reason; it never stops a batch.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from reid_ray import io as rio
from reid_ray.errors import ImageError
from reid_ray.parts import new_run_id, part_name, write_part
from reid_ray.rerank.config import RerankConfig
from reid_ray.runtime import ClusterView, PoolPlan, plan_pool

logger = logging.getLogger(__name__)

#: CPU share of one CPU-stage actor (SIFT, classical matching): single-threaded OpenCV
#: work, so several small actors beat one large one (a 2-core machine holds two beside
#: Ray Data's reserve)
CPUS_PER_CPU_ACTOR = 0.75


def plan_stage_pool(
    cfg: RerankConfig, stage: str, cluster: ClusterView, blocks: int = 0
) -> PoolPlan:
    """The actor pool of one re-ranking stage ("features" or "match") for ``blocks`` Ray
    Data blocks of work (0: unknown): on the stage's device (:meth:`RerankConfig.
    stage_device`), at most one actor per block (an idle actor holds its CPUs or GPU).
    ``actors``/``cpus_per_actor`` apply to both stages, ``gpus_per_actor`` to GPU ones."""
    device = cfg.stage_device(stage)
    return plan_pool(
        cluster,
        device=device,
        actors=cfg.actors,
        cpus_per_actor=cfg.cpus_per_actor,
        gpus_per_actor=cfg.gpus_per_actor if device != "cpu" else 0.0,
        cpus_per_cpu_actor=CPUS_PER_CPU_ACTOR,
        max_actors=max(0, int(blocks)),
    )


PAIRS_DIR = "pairs"
ERRORS_DIR = "errors"
STAGE_FEATURES = "rerank-features"
STAGE_MATCH = "rerank-match"
STAGE_MANIFEST = "rerank-manifest"

SCORES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("gallery_id", pa.string()),
        ("local_score", pa.float64()),
        ("n_matches", pa.int32()),
    ]
)
EXTRACTED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("ok", pa.bool_()),
        ("reason", pa.string()),
        ("keypoints", pa.int64()),
        ("seconds", pa.float64()),
    ]
)
MATCHED_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("pairs", pa.int64()),
        ("scored", pa.int64()),
        ("seconds", pa.float64()),
    ]
)


class FeatureActor:
    """Decode, crop, resize and extract one batch of images into the feature cache."""

    STAGE = "features"

    def __init__(self, cfg: dict, cache_root: str, fingerprint: str, threads: int = 1) -> None:
        from reid_ray.rerank.cache import FeatureCache
        from reid_ray.rerank.config import load_rerank_config
        from reid_ray.rerank.features import build_extractor
        from reid_ray.runtime import hide_unassigned_gpus, resolve_device, set_threads

        hide_unassigned_gpus()
        set_threads(threads)
        self.cfg = load_rerank_config(cfg)
        self.device = resolve_device(self.cfg.stage_device(self.STAGE))
        self.extractor = build_extractor(self.cfg, self.device)
        self.cache = FeatureCache(cache_root, fingerprint, memory_items=0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reid_ray.rerank.features import load_prepared

        out: dict[str, list] = {
            "image_id": [],
            "ok": [],
            "reason": [],
            "keypoints": [],
            "seconds": [],
        }
        for row in batch.to_pylist():
            t0 = time.perf_counter()
            reason, n = None, 0
            try:
                img, mask, scale = load_prepared(row, self.cfg)
                feats = self.extractor.extract(img, mask, scale)
                self.cache.put(row["image_id"], feats)
                n = len(feats)
            except ImageError as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - one bad image never stops the batch
                logger.exception("feature extraction failed for %s", row["image_id"])
                reason = f"feature extraction failed: {type(exc).__name__}: {exc}"
            out["image_id"].append(row["image_id"])
            out["ok"].append(reason is None)
            out["reason"].append(reason)
            out["keypoints"].append(n)
            out["seconds"].append(time.perf_counter() - t0)
        return pa.table(out, schema=EXTRACTED_SCHEMA)


class MatchActor:
    """Match each query of a batch against its candidates; write one part file per batch."""

    STAGE = "match"

    def __init__(
        self,
        cfg: dict,
        cache_root: str,
        fingerprint: str,
        out_dir: str,
        unavailable: dict[str, str],
        threads: int = 1,
        memory_items: int = 512,
    ) -> None:
        from reid_ray.rerank.cache import FeatureCache
        from reid_ray.rerank.config import load_rerank_config
        from reid_ray.rerank.matchers import PairScorer
        from reid_ray.runtime import hide_unassigned_gpus, resolve_device, set_threads

        hide_unassigned_gpus()
        set_threads(threads)
        self.cfg = load_rerank_config(cfg)
        self.device = resolve_device(self.cfg.stage_device(self.STAGE))
        self.scorer = PairScorer(self.cfg, self.device)
        self.cache = FeatureCache(cache_root, fingerprint, memory_items=memory_items)
        self.out_dir = out_dir
        self.unavailable = dict(unavailable)

    def _features(self, image_id: str, errors: list[dict]):
        if image_id in self.unavailable:
            return None
        feats = self.cache.get(image_id)
        if feats is None:
            errors.append(
                {
                    "image_id": image_id,
                    "path": None,
                    "stage": STAGE_MATCH,
                    "reason": "features missing from the cache",
                }
            )
            self.unavailable[image_id] = "features missing from the cache"
        return feats

    def __call__(self, batch: pa.Table) -> pa.Table:
        q_out, g_out, s_out, n_out, errors = [], [], [], [], []
        summary: dict[str, list] = {"query_id": [], "pairs": [], "scored": [], "seconds": []}
        for row in batch.to_pylist():
            t0 = time.perf_counter()
            q, gids = row["query_id"], list(row["gallery_ids"])
            qf = self._features(q, errors)
            scores: list[tuple[float | None, int | None]] = [(None, None)] * len(gids)
            if qf is not None:
                cands = [(i, self._features(g, errors)) for i, g in enumerate(gids)]
                cands = [(i, f) for i, f in cands if f is not None]
                try:
                    for (i, _), sc in zip(
                        cands, self.scorer.score(qf, [f for _, f in cands]), strict=True
                    ):
                        scores[i] = sc
                except Exception as exc:  # noqa: BLE001 - recorded, never crashes the batch
                    logger.exception("matching failed for query %s", q)
                    errors.append(
                        {
                            "image_id": q,
                            "path": None,
                            "stage": STAGE_MATCH,
                            "reason": f"matching failed: {type(exc).__name__}: {exc}",
                        }
                    )
            for g, (s, n) in zip(gids, scores, strict=True):
                q_out.append(q)
                g_out.append(g)
                s_out.append(s)
                n_out.append(n)
            summary["query_id"].append(q)
            summary["pairs"].append(len(gids))
            summary["scored"].append(sum(s is not None for s, _ in scores))
            summary["seconds"].append(time.perf_counter() - t0)
        # the errors part first: it counts only once its pairs part (same name) exists
        name = part_name(new_run_id(), 0)
        if errors:
            from reid_ray.data import errors_table

            write_part(rio.join(self.out_dir, ERRORS_DIR), errors_table(errors), name=name)
        write_part(
            rio.join(self.out_dir, PAIRS_DIR),
            pa.table(
                {"query_id": q_out, "gallery_id": g_out, "local_score": s_out, "n_matches": n_out},
                schema=SCORES_SCHEMA,
            ),
            name=name,
        )
        return pa.table(summary, schema=MATCHED_SCHEMA)
