"""Settings of the gallery and the nightly job, read by :func:`reid_ray.config.load_config`.

One frozen dataclass serves ``gallery build``, ``identify``, ``gallery merge`` and
``jobs/nightly_reid.py`` (a YAML file in ``jobs/configs/``), so a night's settings live in one
file and a misspelled key fails at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reid_ray.config import check, load_config
from reid_ray.embed.config import EmbedConfig


@dataclass(frozen=True)
class SearchConfig:
    """``k`` gallery images per query from FAISS, folded into ``candidates`` identities
    (best image score per identity); ``actors`` searcher actors (0: one per 8 CPUs);
    ``batch_size`` queries per search call."""

    k: int = 50
    candidates: int = 5
    actors: int = 0
    batch_size: int = 1024

    def validate(self) -> None:
        check(self.k >= 1, f"search.k must be >= 1, got {self.k}")
        check(self.candidates >= 1, f"search.candidates must be >= 1, got {self.candidates}")
        check(self.actors >= 0, f"search.actors must be >= 0, got {self.actors}")
        check(self.batch_size >= 1, f"search.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Leave-identity-out calibration on the gallery: at most ``max_queries`` gallery images
    (seeded sample) each searched against the rest with ``k`` neighbours."""

    max_queries: int = 5000
    k: int = 50
    seed: int = 0

    def validate(self) -> None:
        check(
            self.max_queries >= 10, f"calibration.max_queries must be >= 10, got {self.max_queries}"
        )
        check(self.k >= 2, f"calibration.k must be >= 2, got {self.k}")


@dataclass(frozen=True)
class GroupConfig:
    """New images are grouped into one provisional individual by the night's own
    known-vs-new decision: with re-ranking, each new image's ``mutual_k`` nearest new images
    are scored like candidates and a pair the decision accepts is linked; without, mutual
    neighbours (each among the other's ``mutual_k`` nearest) whose cosine reaches the
    gallery's threshold. ``threshold``: a cosine threshold instead (global score only)."""

    mutual_k: int = 5
    threshold: float | None = None

    def validate(self) -> None:
        check(self.mutual_k >= 1, f"group.mutual_k must be >= 1, got {self.mutual_k}")


@dataclass(frozen=True)
class RerankSection:
    """Local-feature re-ranking of the candidates (``reid_ray.rerank``); ``config`` is a
    rerank YAML file (None: its defaults)."""

    enabled: bool = False
    config: str | None = None


@dataclass(frozen=True)
class NightlyConfig:
    """The nightly job: ``manifest`` (new images) against ``gallery``, results to ``out``.

    ``model`` is optional: the gallery records its model; a different one is refused.
    ``night`` tags provisional ids of new individuals (None: the name of ``out``).
    ``merge`` merges the accepted results into the gallery right after identification
    (``reviewed``: a reviewers' CSV to merge instead). ``embed`` holds the embedding
    resources (its ``image_size``/``flip`` come from the gallery at identify time).
    """

    gallery: str = ""
    manifest: str = ""
    out: str = ""
    model: str | None = None
    night: str | None = None
    merge: bool = False
    reviewed: str | None = None
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    rerank: RerankSection = field(default_factory=RerankSection)

    def to_dict(self) -> dict:
        from reid_ray.config import to_dict

        return to_dict(self)


def load_nightly_config(source=None, overrides=None) -> NightlyConfig:
    """A :class:`NightlyConfig` from a YAML/JSON file or dict plus overrides."""
    return load_config(NightlyConfig, source, overrides, section="nightly")


__all__ = [
    "CalibrationConfig",
    "GroupConfig",
    "NightlyConfig",
    "RerankSection",
    "SearchConfig",
    "load_nightly_config",
]
