"""Ray job: ArcFace training on a manifest's train rows (``reid-ray train`` as a job).

    ray job submit --working-dir . -- python jobs/train_arcface.py \
        --config jobs/configs/train_arcface.yaml [--out s3://bucket/run --workers 4 ...]

Thin: the YAML names the manifest, split, output and training settings; options on the
command line override it. The work is ``reid_ray.train.commands.train_command``, the same
function as ``reid-ray train``. On a GPU cluster use ``jobs/configs/gpu_train.yaml``
(``gpus_per_worker: 1``: each worker asks Ray for a GPU; DDP over NCCL, AMP). Joins the cluster named by RAY_ADDRESS (``ray job submit``
sets it), else starts a local one.
"""

from __future__ import annotations

from reid_ray.console import run_as_job
from reid_ray.train.commands import train_command

if __name__ == "__main__":
    run_as_job(train_command)
