"""The benchmark job: config, splits, AUROC, and a tiny real run that resumes."""

from __future__ import annotations

import json
import os
import pathlib

import pandas as pd
import pytest

from reid_ray.benchmark import load_benchmark_config
from reid_ray.benchmark.config import SplitSpec
from reid_ray.benchmark.datasets import cross_session, make_benchmark_split
from reid_ray.errors import ConfigError

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "jobs" / "configs" / "benchmark_toyzoos.yaml"


def test_example_config_loads():
    cfg = load_benchmark_config(str(CONFIG))
    assert len(cfg.datasets) == 2
    assert {m.kind for m in cfg.methods} >= {"pretrained", "finetune"}
    assert any(m.per_species for m in cfg.methods)
    al = next(m for m in cfg.methods if m.kind == "al")
    from reid_ray.benchmark.runner import cell_names

    assert [c for c, _ in cell_names(al)] == ["al@0.5%", "al@2%"]


def test_adding_a_budget_keeps_the_other_budgets_cells_finished(tmp_path):
    from reid_ray import io as rio
    from reid_ray.benchmark.datasets import PreparedDataset
    from reid_ray.benchmark.runner import cell_fingerprints, finished_cell

    split = tmp_path / "split.csv"
    split.write_text("image_id,split\na,train\nb,query\n")
    ds = PreparedDataset(name="d", manifest="m.csv", split=str(split))
    base = {"datasets": [{"name": "d", "manifest": "m.csv"}]}
    aas = {"name": "aas", "kind": "al", "al": {"sampler": "aas"}}
    one = load_benchmark_config({**base, "methods": [{**aas, "budgets": ["0.1%"]}]})
    two = load_benchmark_config({**base, "methods": [{**aas, "budgets": ["0.1%", "0.033%"]}]})
    done = cell_fingerprints(ds, one.methods[0], one, "0.1%")[0]
    assert cell_fingerprints(ds, two.methods[0], two, "0.1%")[0] == done
    assert cell_fingerprints(ds, two.methods[0], two, "0.033%")[0] != done
    other = load_benchmark_config(
        {**base, "methods": [{**aas, "budgets": ["0.1%"], "al": {"sampler": "margin"}}]}
    )
    assert cell_fingerprints(ds, other.methods[0], other, "0.1%")[0] != done
    # a cell recorded before the change (budgets in its fingerprint) is still finished
    path = str(tmp_path / "cell.json")
    old = cell_fingerprints(ds, one.methods[0], one, "0.1%")[1]
    rio.write_json_atomic(path, {"status": "done", "fingerprint": old})
    assert finished_cell(path, done) is None
    assert finished_cell(path, done, old, rewrite=False) is not None  # a report-only look
    assert finished_cell(path, done) is None  # ... leaves the record as it was
    assert finished_cell(path, done, old) is not None
    assert finished_cell(path, done) is not None  # rewritten with today's fingerprint


def test_config_refuses_bad_settings():
    base = {"datasets": [{"name": "a", "manifest": "m.csv"}], "methods": [{"name": "p"}]}
    with pytest.raises(ConfigError, match="unknown setting"):
        load_benchmark_config({**base, "bogus": 1})
    with pytest.raises(ConfigError, match="exactly one of manifest"):
        load_benchmark_config({**base, "datasets": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="kind al needs budgets"):
        load_benchmark_config({**base, "methods": [{"name": "x", "kind": "al"}]})
    with pytest.raises(ConfigError, match="unique"):
        load_benchmark_config({**base, "methods": [{"name": "p"}, {"name": "p"}]})


def _frame(dates: bool) -> pd.DataFrame:
    rows = []
    for ident in range(12):
        for k in range(4):
            rows.append({"image_id": f"i{ident}-{k}", "identity": f"id{ident}",
                         "date": f"2024-0{1 + (k * 7 + ident) % 4}-1{k}" if dates else None})  # fmt: skip
    return pd.DataFrame(rows)


def test_split_is_seeded_and_cross_session_by_date():
    spec = SplitSpec(train_fraction=0.25, val_fraction=0.0, unknown_fraction=0.25)
    frame = _frame(dates=True)
    a, crossed = make_benchmark_split(frame, spec)
    b, _ = make_benchmark_split(frame.sample(frac=1.0, random_state=1), spec)
    assert crossed
    assert (
        a.sort_values("image_id")
        .reset_index(drop=True)
        .equals(b.sort_values("image_id").reset_index(drop=True))
    )
    c, _ = make_benchmark_split(frame, SplitSpec(seed=1, train_fraction=0.25, val_fraction=0.0))
    assert set(c.loc[c["split"] == "train", "image_id"]) != set(
        a.loc[a["split"] == "train", "image_id"]
    )
    merged = a.merge(frame, on="image_id")
    for _, g in merged[merged["split"].isin(["query", "gallery"])].groupby("identity"):
        latest_gallery = pd.to_datetime(g.loc[g["split"] == "gallery", "date"]).max()
        assert (pd.to_datetime(g.loc[g["split"] == "query", "date"]) >= latest_gallery).all()
        assert (g["split"] == "query").sum() == 2


def test_cross_session_needs_dates():
    plain, crossed = make_benchmark_split(_frame(dates=False), SplitSpec())
    assert not crossed and set(plain["split"]) >= {"query", "gallery"}
    with pytest.raises(ConfigError, match="date"):
        make_benchmark_split(_frame(dates=False), SplitSpec(cross_session="yes"))


def test_cross_session_keeps_one_gallery_image():
    frame = pd.DataFrame({"image_id": ["a", "b"], "identity": ["x", "x"],
                          "date": ["2024-01-02", "2024-01-01"]})  # fmt: skip
    split = pd.DataFrame({"image_id": ["a", "b"], "split": ["gallery", "query"]})
    out = cross_session(split, frame, queries_per_identity=2)
    assert dict(zip(out["image_id"], out["split"], strict=True)) == {"a": "query", "b": "gallery"}


def test_species_splits(tmp_path):
    from reid_ray.benchmark.datasets import _species_splits

    frame = pd.DataFrame({"image_id": list("abcdefg"), "species": ["cat"] * 4 + ["dog"] * 2 + [""]})
    split = pd.DataFrame({"image_id": list("abcdefg"),
                          "split": ["gallery", "query", "train", "query_unknown", "gallery",
                                    "train", "gallery"]})  # fmt: skip
    info: dict = {}
    paths = _species_splits(frame, split, "zoo", str(tmp_path), info)
    assert list(paths) == ["cat"]  # dog has no query rows: skipped, and said so
    assert info["species_skipped"] == {"dog": "no gallery or no query rows"}
    cat = pd.read_csv(paths["cat"])
    assert list(cat["image_id"]) == list("abcd")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_benchmark_writes_table_and_resumes(tmp_path, ray_cluster):
    from reid_ray.benchmark import run_benchmark

    zoo = {"species": 2, "individuals": 10, "images_per": 4, "size": 64}
    config = {
        "out": str(tmp_path / "bench"),
        "plots": True,
        "by_species": False,  # per-species splits: test_species_splits
        "split": {"train_fraction": 0.2, "val_fraction": 0.0, "unknown_fraction": 0.25},
        "datasets": [
            {"name": "zoo-a", "synth": {**zoo, "seed": 1}},
            {"name": "zoo-b", "synth": {**zoo, "species": 3, "individuals": 12, "seed": 2}},
        ],
        "methods": [
            {"name": "weak", "kind": "pretrained", "model": "timm:efficientnet_lite0", "image_size": 32},
            {"name": "weak+sift", "kind": "pretrained", "model": "timm:efficientnet_lite0",
             "image_size": 32, "rerank": {"extractor": "sift", "matcher": "classical",
                                          "top_k": 3, "resize_long_side": 64}},
        ],
    }  # fmt: skip
    cfg = load_benchmark_config(config)
    first = run_benchmark(cfg)
    assert first["counts"] == {"cells": 4, "done_before": 0, "run": 4, "failed": 0}
    out = tmp_path / "bench"
    table = pd.read_csv(out / "table.csv")
    assert set(table["dataset"]) == {"zoo-a", "zoo-b"}
    assert set(table["method"]) == {"weak", "weak+sift"}
    assert len(table) == 4 and set(table["species"]) == {"all"}
    assert table["mAP"].between(0, 1).all() and table["auroc"].notna().all()
    assert table.loc[table["method"] == "weak+sift", "global_mAP"].notna().all()
    md = (out / "table.md").read_text()
    assert "| zoo-b |" in md and "weak+sift" in md
    assert (out / "reports" / "zoo-a.md").exists() and (out / "benchmark.png").exists()
    assert (out / "splits" / "zoo-b.csv").exists()
    assert json.loads((out / "manifest.json").read_text())["counts"]["run"] == 4

    cell = out / "cells" / "zoo-a" / "weak.json"
    mtime = os.stat(cell).st_mtime_ns
    again = run_benchmark(cfg)
    assert again["counts"] == {"cells": 4, "done_before": 4, "run": 0, "failed": 0}
    assert os.stat(cell).st_mtime_ns == mtime
    assert pd.read_csv(out / "table.csv").equals(table)

    # a changed method is redone on every dataset, the unchanged one is not
    config["methods"][0]["image_size"] = 40
    changed = run_benchmark(load_benchmark_config(config))
    assert changed["counts"] == {"cells": 4, "done_before": 2, "run": 2, "failed": 0}
