"""Benchmark configuration: datasets x methods, read by the one config loader.

A benchmark file (``jobs/configs/benchmark_toyzoos.yaml``) names the output folder, how
splits are made, the datasets and the methods; every dataset x method pair is one *cell*,
evaluated with the benchmark protocol of ``reid_ray.evaluation.evaluate`` and kept under
``OUT/cells/`` so a rerun skips it. Unknown keys are refused at every level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from reid_ray.config import check, check_choice, load_config

METHOD_KINDS = ("pretrained", "checkpoint", "finetune", "usl", "al")
SPLIT_KINDS = ("disjoint", "open")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class SynthSpec:
    """A toy zoo generated into ``OUT/data/<dataset>`` (``reid_ray.synth.generate_zoo``)."""

    species: int = 2
    individuals: int = 24
    images_per: int = 6
    size: int = 128
    seed: int = 0


@dataclass(frozen=True)
class WildlifeSpec:
    """A wildlife-datasets dataset: ``dataset`` is its class name (needs the optional
    ``wildlife-datasets`` package and the data under ``root``), or ``table`` a CSV/Parquet
    of its metadata table (paths relative to ``root``, default the table's folder)."""

    dataset: str | None = None
    table: str | None = None
    root: str | None = None
    species: str | None = None  # fills rows without a species

    def validate(self) -> None:
        check(
            (self.dataset is None) != (self.table is None),
            "a wildlife dataset names exactly one of dataset (a wildlife-datasets class) or table",
        )
        check(self.dataset is None or self.root is not None, "wildlife.dataset needs root")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: exactly one of ``manifest`` (with an optional ``split`` file; without one
    a split is made from the benchmark's ``split`` settings), ``wildlife`` or ``synth``."""

    name: str
    manifest: str | None = None
    split: str | None = None
    wildlife: WildlifeSpec | None = None
    synth: SynthSpec | None = None

    def validate(self) -> None:
        check(
            bool(_NAME.match(self.name)), f"dataset name {self.name!r}: use letters, digits, _.+-"
        )
        sources = [s for s in (self.manifest, self.wildlife, self.synth) if s is not None]
        check(
            len(sources) == 1,
            f"dataset {self.name}: give exactly one of manifest, wildlife or synth",
        )
        check(self.split is None or self.manifest is not None, f"dataset {self.name}: split "
              "goes with manifest (wildlife and synth datasets get a made split)")  # fmt: skip


@dataclass(frozen=True)
class MethodSpec:
    """One column of the table.

    ``kind``: ``pretrained`` (``model`` as it is: ``timm:NAME``, ``hf-hub:...``),
    ``checkpoint`` (``model`` is a trained checkpoint), ``finetune`` (train ``model`` on each
    dataset's ``train`` rows with ``train`` settings, then evaluate), ``usl`` / ``al`` (the
    active-learning stage, ``reid_ray.active.run_al``: no annotations, or one run at each
    of ``budgets``: fractions of all pairs of the train rows, ``"0.033%"``, or counts; ``al``:
    other ``ALConfig`` settings such as sampler, rounds, train).
    ``rerank``: None (global ranking) or ``RerankConfig`` settings (``{}`` = the defaults).
    ``per_species``: fine-tune one model per species and evaluate each on its own species
    (MiewID's comparison against one model over all species).
    """

    name: str
    kind: str = "pretrained"
    model: str = "timm:efficientnet_lite0"
    image_size: int | None = None
    rerank: dict[str, Any] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    per_species: bool = False
    budgets: tuple[float | str, ...] = ()
    al: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        check(bool(_NAME.match(self.name)), f"method name {self.name!r}: use letters, digits, _.+-")
        check_choice(f"method {self.name}: kind", self.kind, METHOD_KINDS)
        check(
            not self.per_species or self.kind == "finetune",
            f"method {self.name}: per_species applies to kind finetune",
        )
        check(
            self.kind != "al" or len(self.budgets) > 0,
            f"method {self.name}: kind al needs budgets (fractions of pairs, e.g. [0.001, 0.01])",
        )
        check(
            not self.al or self.kind in ("usl", "al"),
            f"method {self.name}: al settings apply to kinds usl and al",
        )
        check(self.image_size is None or self.image_size >= 16, "image_size must be >= 16")


@dataclass(frozen=True)
class SplitSpec:
    """How splits are made for datasets without a split file (``reid_ray.data.make_split``,
    seeded by SHA-256: identical on every machine). ``cross_session``: where every labelled
    row has a date, each known individual's latest images are the queries and its earlier
    ones the gallery (``auto``: whenever dates exist)."""

    kind: str = "disjoint"
    seed: int = 0
    train_fraction: float = 0.5
    val_fraction: float = 0.1
    unknown_fraction: float = 0.2
    queries_per_identity: int = 2
    cross_session: str = "auto"

    def validate(self) -> None:
        check_choice("split.kind", self.kind, SPLIT_KINDS)
        check_choice("split.cross_session", self.cross_session, ("auto", "yes", "no"))


@dataclass(frozen=True)
class BenchmarkConfig:
    """The whole benchmark. ``by_species``: also evaluate every cell on each species'
    rows alone (always on for datasets that a per-species method runs on)."""

    out: str = "benchmark-out"
    datasets: tuple[DatasetSpec, ...] = ()
    methods: tuple[MethodSpec, ...] = ()
    split: SplitSpec = field(default_factory=SplitSpec)
    by_species: bool = True
    k: int = 100
    ray_address: str | None = None
    num_cpus: int | None = None
    plots: bool = True

    def validate(self) -> None:
        check(len(self.datasets) > 0, "a benchmark needs at least one dataset")
        check(len(self.methods) > 0, "a benchmark needs at least one method")
        for what, names in (
            ("dataset", [d.name for d in self.datasets]),
            ("method", [m.name for m in self.methods]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            check(not dup, f"{what} names must be unique; repeated: {', '.join(dup)}")
        check(self.k >= 1, f"k must be >= 1, got {self.k}")


def load_benchmark_config(source: Any = None, overrides: Any = None) -> BenchmarkConfig:
    """A :class:`BenchmarkConfig` from a YAML/JSON file or dict plus ``KEY=VALUE`` overrides."""
    return load_config(BenchmarkConfig, source, overrides)
