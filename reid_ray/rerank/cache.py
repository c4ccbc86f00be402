"""The on-disk per-image feature cache, keyed by ``image_id`` and the extractor fingerprint.

Layout (local folder or ``s3://`` prefix)::

    <root>/<fingerprint>/config.json          the settings that produced these features
    <root>/<fingerprint>/<ab>/<sha1>.npz      one file per image (sha1 of the image_id)

Each file is written atomically, so a crash never leaves a half-written entry; the missing
keys are found with one listing before any work is done, and features are extracted once
per image whatever the number of pairs it takes part in (wildlife-tools' cache by id).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from reid_ray import io as rio
from reid_ray.errors import OutputError
from reid_ray.rerank.features import LocalFeatures

logger = logging.getLogger(__name__)


def _key(image_id: str) -> str:
    return hashlib.sha1(str(image_id).encode()).hexdigest()


class FeatureCache:
    """Per-image features under ``root/fingerprint``; ``get`` keeps a small LRU in memory."""

    def __init__(self, root: str, fingerprint: str, memory_items: int = 1024) -> None:
        self.root = str(root)
        self.fingerprint = fingerprint
        self.dir = rio.join(self.root, fingerprint)
        self._lru: OrderedDict[str, LocalFeatures] = OrderedDict()
        self._memory_items = int(memory_items)

    def path_for(self, image_id: str) -> str:
        key = _key(image_id)
        return rio.join(self.dir, key[:2], f"{key}.npz")

    # -- bookkeeping -------------------------------------------------------------------------
    def write_config(self, settings: Mapping[str, Any]) -> None:
        """Record the settings once; refuse a folder that holds other settings."""
        path = rio.join(self.dir, "config.json")
        wanted = {"fingerprint": self.fingerprint, **dict(settings)}
        if rio.exists(path):
            found = rio.read_json(path)
            if found.get("fingerprint") != self.fingerprint:
                raise OutputError(
                    f"feature cache {self.dir} holds {found.get('fingerprint')!r} features"
                )
            return
        rio.write_json_atomic(path, wanted)

    def cached_ids(self, image_ids: Iterable[str]) -> set[str]:
        """Which of ``image_ids`` have an entry (one listing of the cache folder)."""
        fs, bare = rio.filesystem(self.dir)
        try:
            present = {
                p.rsplit("/", 1)[-1][: -len(".npz")] for p in fs.find(bare) if p.endswith(".npz")
            }
        except FileNotFoundError:
            present = set()
        return {i for i in image_ids if _key(i) in present}

    def missing(self, image_ids: Iterable[str]) -> list[str]:
        """The ids without an entry, in first-seen order, without duplicates."""
        ids = list(dict.fromkeys(str(i) for i in image_ids))
        have = self.cached_ids(ids)
        return [i for i in ids if i not in have]

    # -- entries -----------------------------------------------------------------------------
    def put(self, image_id: str, feats: LocalFeatures) -> None:
        buf = io.BytesIO()
        np.savez(
            buf,
            image_id=np.array(str(image_id)),
            keypoints=feats.keypoints.astype(np.float32),
            descriptors=feats.descriptors.astype(np.float32),
            scores=feats.scores.astype(np.float32),
            image_size=np.array(feats.image_size, dtype=np.int64),
            scale=np.array(feats.scale, dtype=np.float64),
        )
        rio.write_bytes_atomic(self.path_for(image_id), buf.getvalue())

    def get(self, image_id: str) -> LocalFeatures | None:
        """The cached features, or None when there is no entry."""
        image_id = str(image_id)
        if image_id in self._lru:
            self._lru.move_to_end(image_id)
            return self._lru[image_id]
        try:
            data = rio.read_bytes(self.path_for(image_id))
        except FileNotFoundError:
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if str(z["image_id"]) != image_id:  # a sha1 collision would land here
                return None
            feats = LocalFeatures(
                z["keypoints"],
                z["descriptors"],
                z["scores"],
                (int(z["image_size"][0]), int(z["image_size"][1])),
                float(z["scale"]),
            )
        self._lru[image_id] = feats
        if len(self._lru) > self._memory_items:
            self._lru.popitem(last=False)
        return feats
