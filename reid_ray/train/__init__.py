"""Training: Ray Train (DDP) over a timm backbone + GeM + embedding neck, with sub-centre
ArcFace and dynamic class-frequency margins.

Pure parts (no Ray): :mod:`~reid_ray.train.config`, :mod:`~reid_ray.train.losses`,
:mod:`~reid_ray.train.augment`, :mod:`~reid_ray.train.sampler`,
:mod:`~reid_ray.train.validate`. Ray wiring: :mod:`~reid_ray.train.loop` (the per-worker
function) and :mod:`~reid_ray.train.trainer` (``train()``). Importing this package is light.
"""

from reid_ray.train.config import AugmentConfig, JobConfig, LossConfig, TrainConfig, load_job_config


def train(manifest_path: str, out: str, **kwargs) -> dict:
    """Train with Ray Train; see :func:`reid_ray.train.trainer.train`."""
    from reid_ray.train.trainer import train as _train

    return _train(manifest_path, out, **kwargs)


__all__ = ["AugmentConfig", "JobConfig", "LossConfig", "TrainConfig", "load_job_config", "train"]
