"""Ray job: the Ray Tune sweep of active-learning settings (``reid-ray sweep`` as a job).

    ray job submit --working-dir . -- python jobs/al_sweep.py \
        --config jobs/configs/sweep_toyzoos.yaml [--out s3://bucket/sweep --set max_concurrent=8]

Thin: the YAML names datasets, samplers, budgets, seeds and resources per trial; the work is
``reid_ray.benchmark.commands.sweep_command``, the same function as ``reid-ray sweep``. A rerun
with the same output restores the Tune experiment: finished trials are not redone.
"""

from reid_ray.benchmark.commands import sweep_command
from reid_ray.console import run_as_job

if __name__ == "__main__":
    run_as_job(sweep_command)
