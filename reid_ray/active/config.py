"""Settings of one active-learning run (``reid-ray al``, ``jobs/configs/al*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reid_ray.active.clustering import ClusterConfig
from reid_ray.active.constraints import DEFAULT_MERGE, MERGE_POLICIES
from reid_ray.active.samplers import DEFAULT_BUDGET, SAMPLERS, parse_budget
from reid_ray.config import check, check_choice, load_config

ORACLES = ("simulated", "human")


def _small_train() -> dict[str, Any]:
    # A short fine-tune per round: AL runs are many (sweeps), each round trains again.
    # 4 epochs on shuffled batches: on the real dogs every AL cell ended 0.03-0.07 mAP above
    # its 2-epoch P x K counterpart (benchmarks/results/al_dogfacenet_4ep.json). One CPU per
    # worker leaves the rest to Ray Data's decode tasks (a worker holding 1.5 of 2 CPUs left
    # them none and the run hung, measured here).
    return {
        "epochs": 4, "workers": 1, "cpus_per_worker": 1.0, "batch_size": 16, "sampler": "random",
    }  # fmt: skip


@dataclass(frozen=True)
class ALConfig:
    """One AL run. ``budget``: the pairs a person (or the simulated oracle) answers, a count
    (``"1000"``, the default) or, to compare with the AAS paper, a fraction of all pairs of
    the ``train`` rows (``"0.033%"``), spent over ``rounds`` (what a round does not spend
    moves on). ``evaluate``: score each round on labelled ``query``/``gallery`` rows when
    there are any (skipped, and said so, when there are none). ``train``:
    overrides of ``reid_ray.train.TrainConfig`` (its ``model`` is set per round: the run's
    ``model`` first, then the previous round's checkpoint). ``image_size``: input side for
    the starting model (checkpoints keep their own)."""

    manifest: str = ""
    split: str | None = None
    out: str = ""
    model: str = "timm:efficientnet_lite0"
    sampler: str = "aas"
    budget: str = str(DEFAULT_BUDGET)
    rounds: int = 2
    oracle: str = "simulated"
    seed: int = 0
    image_size: int | None = None
    min_cluster_size: int = 2  # smaller pseudo-identities are left out of training
    merge: str = DEFAULT_MERGE  # what a must-link across two clusters moves (MERGE_POLICIES)
    evaluate: bool = True  # the benchmark protocol after each round (when labels allow)
    evaluate_start: bool = True  # also evaluate the starting model (the "pretrained" row)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: dict[str, Any] = field(default_factory=_small_train)

    def validate(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("oracle", self.oracle, ORACLES)
        check_choice("merge", self.merge, tuple(MERGE_POLICIES))
        check(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        check(self.min_cluster_size >= 2, "min_cluster_size must be >= 2")
        check(
            self.image_size is None or 16 <= self.image_size <= 2048,
            f"image_size must be in [16, 2048], got {self.image_size}",
        )
        parse_budget(self.budget)
        check("model" not in self.train, "train.model is set per round: use `model`")
        self.train_config()

    def budget_value(self) -> float | int:
        return parse_budget(self.budget)

    def train_config(self, model: str | None = None):
        """The ``TrainConfig`` of one round (validated: a bad key fails at load time)."""
        from reid_ray.train import TrainConfig

        base = load_config(TrainConfig, dict(self.train))
        changes: dict[str, Any] = {"seed": self.seed}
        if model is not None:
            changes["model"] = model
        if self.image_size is not None and "image_size" not in self.train:
            changes["image_size"] = self.image_size
        return load_config(TrainConfig, base, changes)


def load_al_config(source=None, overrides=None) -> ALConfig:
    """An ``ALConfig`` from a dict or a YAML/JSON file (``al:`` section or top level)."""
    return load_config(ALConfig, source, overrides, section="al")


__all__ = ["ORACLES", "ALConfig", "load_al_config"]
