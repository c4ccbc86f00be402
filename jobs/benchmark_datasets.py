"""Ray job: the benchmark across datasets (``reid-ray benchmark`` as a job).

    ray job submit --working-dir . -- python jobs/benchmark_datasets.py \
        --config jobs/configs/benchmark_toyzoos.yaml [--out s3://bucket/bench --set split.seed=1]

Thin: the YAML names the datasets, the methods and the output; the work is
``reid_ray.benchmark.commands.benchmark_command``, the same function as ``reid-ray benchmark``.
Joins the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else starts a local one.
A rerun with the same output resumes: finished dataset x method cells are not redone.
"""

from reid_ray.benchmark.commands import benchmark_command
from reid_ray.console import run_as_job

if __name__ == "__main__":
    run_as_job(benchmark_command)
