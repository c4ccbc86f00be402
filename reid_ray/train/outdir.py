"""The training output folder: start cleanly, or resume only a run of the same config.

``OUT/train_config.json`` records what defines a run (training settings less resources and
length, network, preprocessing, classes, held-out identities); a rerun with another config
in the same ``OUT`` is refused instead of silently mixing two runs' checkpoints.
"""

from __future__ import annotations

import hashlib
import json

from reid_ray import io as rio
from reid_ray.errors import OutputError
from reid_ray.models import CALIBRATION_FILE, CHECKPOINT_FILE
from reid_ray.parts import MANIFEST_FILE, read_run_record

RUN_NAME = "run"
CONFIG_FILE = "train_config.json"
OUTPUT_FILES = (
    CHECKPOINT_FILE, "metrics.json", "errors.parquet", MANIFEST_FILE, CONFIG_FILE, CALIBRATION_FILE,
)  # fmt: skip


#: settings that may change between a run and its resumption (resources, length)
RESUMABLE_CHANGES = (
    "epochs", "workers", "cpus_per_worker", "gpus_per_worker", "max_failures",
    "keep_checkpoints", "decoded_cache_mb", "feed", "shard_cache", "shard_format", "shard_quality",
)  # fmt: skip


def config_record(
    train: dict, net: dict, preprocess: dict, classes: list[str], held_out: list[str]
) -> dict:
    """What defines a run: ``train`` settings (less :data:`RESUMABLE_CHANGES`), network,
    preprocessing, the classes and the held-out calibration identities."""
    return {
        "train": {k: v for k, v in train.items() if k not in RESUMABLE_CHANGES},
        "net": net,
        "preprocess": preprocess,
        "classes_sha256": hashlib.sha256("\n".join(classes).encode()).hexdigest(),
        "n_classes": len(classes),
        "calibration_sha256": hashlib.sha256("\n".join(held_out).encode()).hexdigest(),
    }


def _normalise(obj):
    return json.loads(json.dumps(rio.json_safe(obj), default=str))


def _config_diff(prior, record: dict) -> list[str]:
    """Names of the settings that differ (``section.key`` inside sections)."""
    if not isinstance(prior, dict):
        return ["<unreadable train_config.json>"]
    diff = []
    for key in sorted(set(prior) | set(record)):
        a, b = prior.get(key), record.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diff.append(key)
    return diff


def prepare_out(out: str, record: dict, resume: bool) -> None:
    """Start cleanly (no resume) or check that ``out`` holds a run of the same config."""
    config_path = rio.join(out, CONFIG_FILE)
    if not resume:
        for name in OUTPUT_FILES:
            rio.remove(rio.join(out, name))
        rio.remove(rio.join(out, RUN_NAME), recursive=True)
    elif rio.exists(config_path):
        diff = _config_diff(_normalise(rio.read_json(config_path)), _normalise(record))
        if diff:
            raise OutputError(
                f"{out} holds a training run with another configuration (differs in: "
                f"{', '.join(diff)}); use --no-resume to start over there, or another --out"
            )
    elif rio.exists(rio.join(out, RUN_NAME)):
        raise OutputError(
            f"{out}/{RUN_NAME} exists without {CONFIG_FILE}: use --no-resume or another --out"
        )
    rio.makedirs(out)
    if not rio.exists(config_path):
        rio.write_json_atomic(config_path, record)


def completed_run(out: str, epochs: int) -> dict | None:
    """The summary of a finished run in ``out`` that already reached ``epochs``."""
    if read_run_record(out) is None or not rio.exists(rio.join(out, "metrics.json")):
        return None
    metrics = rio.read_json(rio.join(out, "metrics.json"))
    if metrics.get("epochs_completed", 0) >= epochs and metrics.get("epochs_requested") == epochs:
        return metrics
    return None
