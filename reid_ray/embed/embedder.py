"""The embedding kernel: a callable class that turns a batch of decoded images into
L2-normalised float32 embeddings. No Ray here: it runs (and is tested) in one process, and
the pipeline hands it to ``Dataset.map_batches`` as an actor pool.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from reid_ray.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


def embedding_key(fingerprint: str, flip: bool) -> str:
    """What the ``model`` column of the embeddings stores: the model fingerprint, plus the
    test-time augmentation when it changes the vectors (cached vectors of one key are
    never mixed with another's)."""
    return f"{fingerprint}+flip" if flip else fingerprint


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length; also returns a mask of rows that could be normalised
    (finite, non-zero norm)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1) if x.size else np.zeros(len(x), np.float32)
    ok = np.isfinite(norms) & (norms > eps)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norms[ok, None]
    return out, ok


class Embedder:
    """Load a model once; map batches ``{image_id, image, error, ...}`` to embeddings.

    Args:
        model_ref: any ``reid_ray.models.load`` reference.
        image_size: override of the model's input side.
        flip: horizontal-flip test-time augmentation.
        device: "auto" (cuda when available), "cpu" or "cuda".
        precision: "auto" (fp16 autocast on cuda, fp32 on CPU), "fp32" or "fp16".
        threads: torch intra-op threads (0: leave torch's setting). Ray sets
            ``OMP_NUM_THREADS=1`` in workers, so the pipeline passes the actor's CPU share.
        expected_key: when given, the loaded model's embedding key must equal it (every
            actor of a pool embeds with exactly the model the driver planned for).

    Rows whose ``error`` is non-empty are passed through with their reason and a zero
    vector; a row whose embedding is not finite or is zero becomes an error row. The
    output batch has ``image_id``, ``path``, ``embedding`` [N, D] float32, ``error`` (the
    reason, "" when fine) and ``stage`` (decode | embed, "" when fine).
    """

    def __init__(
        self,
        model_ref: str,
        *,
        image_size: int | None = None,
        flip: bool = False,
        device: str = "auto",
        precision: str = "auto",
        threads: int = 0,
        expected_key: str | None = None,
    ) -> None:
        import torch

        from reid_ray.models import load
        from reid_ray.runtime import hide_unassigned_gpus, resolve_device

        hide_unassigned_gpus()  # a CPU actor on a GPU node never touches its GPUs
        if threads:
            torch.set_num_threads(int(threads))
        requested = device
        device = resolve_device(device)  # cuda without a GPU raises: no silent CPU run
        if precision == "auto" or (device == "cpu" and requested == "cuda"):
            # the second case: REID_RAY_COMPUTE_DEVICE=cpu on a fake GPU node (logged)
            precision = "fp16" if device == "cuda" else "fp32"
        if precision == "fp16" and device != "cuda":
            raise ConfigError("fp16 inference needs a GPU")
        self.device = device
        self.precision = precision
        self.flip = bool(flip)
        self.loaded = load(model_ref, image_size=image_size, device=device)
        self.preprocess = self.loaded.preprocess
        self.key = embedding_key(self.loaded.fingerprint, self.flip)
        if expected_key is not None and self.key != expected_key:
            raise ModelError(
                f"model {model_ref!r} loaded on this worker has fingerprint {self.key}, the "
                f"driver's has {expected_key}: the model differs between machines (a checkpoint "
                "must be on shared storage or s3://; hub caches must hold the same revision)"
            )
        self.dim = int(self.loaded.embedding_dim)
        logger.info(
            "Embedder %s on %s (%s, %d threads): %s",
            model_ref,
            device,
            precision,
            torch.get_num_threads(),
            self.loaded.description,
        )

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W, 3] uint8 at the model's input size -> [N, D] float32, not normalised."""
        import torch

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"images must have shape [N, H, W, 3], got {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
            x = self.preprocess.normalize(x)
            if self.flip:
                x = torch.cat([x, torch.flip(x, dims=[3])], dim=0)
            if self.precision == "fp16":
                with torch.autocast("cuda", dtype=torch.float16):
                    feats = self.loaded.model(x)
            else:
                feats = self.loaded.model(x)
            feats = feats.float()
            if self.flip:
                n = len(images)
                feats = feats[:n] + feats[n:]
            return feats.cpu().numpy().astype(np.float32, copy=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["image_id"], dtype=object)
        n = len(ids)
        errors = np.asarray(batch.get("error", np.full(n, "", dtype=object)), dtype=object).copy()
        ok = np.array([not e for e in errors], dtype=bool)
        stages = np.where(ok, "", "decode").astype(object)
        embeddings = np.zeros((n, self.dim), dtype=np.float32)
        if ok.any():
            feats = self.embed_images(np.asarray(batch["image"])[ok])
            normed, good = l2_normalize(feats)
            embeddings[ok] = normed
            rows = np.flatnonzero(ok)
            for r in rows[~good]:
                errors[r] = "embedding is not finite or is zero"
                stages[r] = "embed"
        paths = batch.get("path")
        return {
            "image_id": ids,
            "path": np.asarray(paths if paths is not None else np.full(n, None), dtype=object),
            "embedding": embeddings,
            "error": errors.astype(str),
            "stage": stages.astype(str),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "ref": self.loaded.ref,
            "description": self.loaded.description,
            "fingerprint": self.loaded.fingerprint,
            "key": self.key,
            "embedding_dim": self.dim,
            "device": self.device,
            "precision": self.precision,
            "flip": self.flip,
            "preprocess": self.preprocess.to_dict(),
        }
