"""Benchmark datasets: manifest + split, wildlife-datasets tables and toy zoos, made ready once.

Every dataset ends as a manifest and a split file; the split files used are written under
``OUT/splits/`` (``<dataset>.csv``, plus ``<dataset>.<species>.csv`` per species when there are
several), seeded by SHA-256 (``reid_ray.data.make_split``), so every machine gets the same.
Where every query/gallery row has a date, the split is cross-session: each known individual's
latest images are its queries and the earlier ones its gallery (a model must recognise an
animal on a later day, not a near-duplicate frame of the same encounter).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from reid_ray import io as rio
from reid_ray.benchmark.config import BenchmarkConfig, DatasetSpec, SplitSpec
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("query", "gallery", "query_unknown")


@dataclass
class PreparedDataset:
    """A dataset ready to benchmark: where its manifest and split are, and what it holds."""

    name: str
    manifest: str
    split: str
    species_splits: dict[str, str] = field(default_factory=dict)  # species -> split file
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Changes when the split does: cells evaluated on another split are redone."""
        return hashlib.sha256(rio.read_bytes(self.split)).hexdigest()[:16]


def species_slug(species: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", species) or "_"


def _source_manifest(spec: DatasetSpec, out: str) -> tuple[str, dict[str, Any]]:
    """The manifest path of ``spec``, generating or converting it under OUT/data first."""
    folder = rio.join(out, "data", spec.name)
    if spec.manifest is not None:
        return spec.manifest, {"source": spec.manifest}
    if spec.synth is not None:
        from reid_ray.synth import generate_zoo

        s = spec.synth
        metadata = rio.join(folder, "metadata.csv")
        info_path = rio.join(folder, "zoo.json")
        wanted = {"species": s.species, "individuals": s.individuals, "images_per": s.images_per,
                  "size": s.size, "seed": s.seed}  # fmt: skip
        if not (rio.exists(metadata) and _same_zoo(info_path, wanted)):
            generate_zoo(folder, split_kind="disjoint", **wanted)
        return metadata, {"source": "toy zoo", "synth": wanted}
    from reid_ray.data.wildlife import load_wildlife_dataset, write_wildlife_manifest

    w = spec.wildlife
    assert w is not None
    source = load_wildlife_dataset(w.dataset, w.root) if w.dataset else w.table
    metadata = rio.join(folder, "metadata.csv")
    conv = write_wildlife_manifest(source, metadata, root=w.root, species=w.species)
    return metadata, {
        "source": f"wildlife-datasets {w.dataset or w.table}",
        "conversion": conv.counts,
        "dropped_columns": conv.dropped_columns,
    }


def _same_zoo(info_path: str, wanted: dict[str, Any]) -> bool:
    if not rio.exists(info_path):
        return False
    info = rio.read_json(info_path)
    params = info.get("params", info)
    return all(params.get(k) == v for k, v in wanted.items())


def cross_session(
    split: pd.DataFrame, frame: pd.DataFrame, queries_per_identity: int
) -> pd.DataFrame:
    """Re-assign each known test individual's query/gallery images by date: the latest
    ``min(queries_per_identity, n - 1)`` become queries, the earlier ones the gallery."""
    meta = frame.set_index("image_id")
    out = split.copy()
    known = out["split"].isin(("query", "gallery"))
    rows = out[known].copy()
    rows["identity"] = meta.loc[rows["image_id"], "identity"].to_numpy()
    rows["date"] = pd.to_datetime(meta.loc[rows["image_id"], "date"].to_numpy(), format="mixed")
    assigned: dict[str, str] = {}
    for _, group in rows.groupby("identity", sort=True):
        ordered = group.sort_values(["date", "image_id"], kind="stable")["image_id"].tolist()
        n_query = min(queries_per_identity, len(ordered) - 1)
        assigned.update({i: "gallery" for i in ordered[: len(ordered) - n_query]})
        assigned.update({i: "query" for i in ordered[len(ordered) - n_query :]})
    out.loc[known, "split"] = out.loc[known, "image_id"].map(assigned)
    return out


def _has_dates(frame: pd.DataFrame, ids: pd.Series) -> bool:
    if "date" not in frame.columns:
        return False
    dates = frame.set_index("image_id").loc[ids, "date"]
    parsed = pd.to_datetime(dates.where(dates.astype(str).str.strip() != ""), errors="coerce",
                            format="mixed")  # fmt: skip
    return bool(len(parsed)) and bool(parsed.notna().all())


def make_benchmark_split(frame: pd.DataFrame, s: SplitSpec) -> tuple[pd.DataFrame, bool]:
    """The seeded split of a manifest frame; ``(split, cross_session_used)``."""
    from reid_ray.data import make_split

    split = make_split(
        frame, kind=s.kind, seed=s.seed, train_fraction=s.train_fraction,
        val_fraction=s.val_fraction, unknown_fraction=s.unknown_fraction,
        queries_per_identity=s.queries_per_identity,
    )  # fmt: skip
    known = split.loc[split["split"].isin(("query", "gallery")), "image_id"]
    dated = _has_dates(frame, known)
    if s.cross_session == "yes" and not dated:
        raise ConfigError("split.cross_session is yes but not every query/gallery row has a date")
    if s.cross_session != "no" and dated:
        return cross_session(split, frame, s.queries_per_identity), True
    return split, False


def _write_if_changed(split: pd.DataFrame, path: str) -> None:
    from reid_ray.data import write_split

    text = split[["image_id", "split"]].to_csv(index=False).encode("utf-8")
    if not (rio.exists(path) and rio.read_bytes(path) == text):
        write_split(split, path)


def prepare_dataset(
    spec: DatasetSpec, cfg: BenchmarkConfig, *, per_species: bool
) -> PreparedDataset:
    """Make ``spec`` ready: manifest, split (given or made), per-species splits."""
    from reid_ray.data import read_manifest, read_split

    out = cfg.out
    manifest_path, info = _source_manifest(spec, out)
    manifest = read_manifest(manifest_path)
    frame = manifest.to_pandas()
    info["rows"] = len(frame)
    info["manifest_errors"] = manifest.errors.num_rows
    split_path = rio.join(out, "splits", f"{spec.name}.csv")
    if spec.split is not None:
        split = read_split(spec.split)
        info["split"] = f"given: {spec.split}"
        info["cross_session"] = False
    else:
        split, crossed = make_benchmark_split(frame, cfg.split)
        info["split"] = f"made: {cfg.split.kind}, seed {cfg.split.seed}"
        info["cross_session"] = crossed
    _write_if_changed(split, split_path)
    info["split_counts"] = split["split"].value_counts().to_dict()
    prepared = PreparedDataset(spec.name, manifest_path, split_path, info=info)
    if per_species and "species" in frame.columns:
        prepared.species_splits = _species_splits(frame, split, spec.name, out, info)
    return prepared


def _species_splits(frame: pd.DataFrame, split: pd.DataFrame, name: str, out: str,
                    info: dict[str, Any]) -> dict[str, str]:  # fmt: skip
    """One split file per species (its rows only) for datasets with several species; a
    species without gallery or query rows is listed in ``info['species_skipped']``."""
    species_of = frame.set_index("image_id")["species"].fillna("").astype(str)
    labelled = split.assign(species=species_of.reindex(split["image_id"]).fillna("").to_numpy())
    names = sorted(s for s in labelled["species"].unique() if s)
    if len(names) < 2:
        return {}
    paths: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for sp in names:
        rows = labelled[labelled["species"] == sp][["image_id", "split"]]
        counts = rows["split"].value_counts()
        if (
            counts.get("gallery", 0) == 0
            or counts.get("query", 0) + counts.get("query_unknown", 0) == 0
        ):
            skipped[sp] = "no gallery or no query rows"
            continue
        path = rio.join(out, "splits", f"{name}.{species_slug(sp)}.csv")
        _write_if_changed(rows, path)
        paths[sp] = path
    info["species"] = names
    if skipped:
        info["species_skipped"] = skipped
    return paths
