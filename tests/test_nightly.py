"""The nightly flow on a toy zoo: gallery build, two nights of identify + merge, reviewed
corrections, crashes mid-merge and mid-identify, bad images, another model refused.

Real parts only: a local Ray cluster, real JPEG files from ``generate_zoo``, the offline
ImageNet EfficientNet-Lite0 at 64 px. Byte-identical copies of gallery images under new ids
are the cases whose right answer does not depend on the model's quality.
"""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pyarrow as pa
import pytest

from reid_ray.errors import ConfigError, OutputError

MODEL = "timm:efficientnet_lite0"
pytestmark = pytest.mark.slow


def _cfg(**extra):
    from reid_ray.gallery import load_nightly_config

    return load_nightly_config(
        {"embed": {"image_size": 64}, "night": "n1", "calibration": {"k": 20}, **extra}
    )


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory):
    """A zoo, a gallery (individuals 0-5, images 0-2) and night 1 identified."""
    from reid_ray.gallery import build_gallery, identify
    from reid_ray.synth import generate_zoo

    root = tmp_path_factory.mktemp("nightly")
    zoo = root / "zoo"
    generate_zoo(str(zoo), species=2, individuals=10, images_per=5, size=64, seed=3)
    meta = pd.read_csv(zoo / "metadata.csv")
    meta["path"] = [str(zoo / p) for p in meta["path"]]
    ids = sorted(meta["identity"].unique())
    meta["j"] = meta.groupby("identity").cumcount()
    known, new1, new2 = ids[:6], ids[6:8], ids[8:10]
    gallery = meta[meta.identity.isin(known) & (meta.j < 3)]
    copies = []
    for _, row in gallery.head(2).iterrows():  # exact copies: must come back known, right
        dst = zoo / f"copy-{row.image_id}.jpg"
        shutil.copy(row.path, dst)
        copies.append({**row.to_dict(), "image_id": f"copy-{row.image_id}", "path": str(dst)})
    (zoo / "corrupt.jpg").write_bytes(b"this is not a JPEG")
    bad = [
        {"image_id": "corrupt", "path": str(zoo / "corrupt.jpg"), "identity": known[0]},
        {"image_id": "missing", "path": str(zoo / "no-such.jpg"), "identity": known[0]},
    ]
    night1 = pd.concat(
        [
            meta[meta.identity.isin(known) & (meta.j == 3)],
            meta[meta.identity.isin(new1)],
            pd.DataFrame(copies),
            pd.DataFrame(bad),
        ]
    )
    night2 = pd.concat(
        [meta[meta.identity.isin(known) & (meta.j == 4)], meta[meta.identity.isin(new2)]]
    )
    cols = ["image_id", "path", "identity"]
    for name, frame in (("gallery", gallery), ("night1", night1), ("night2", night2)):
        frame[cols].to_csv(root / f"{name}.csv", index=False)
    g = str(root / "G")
    build = build_gallery(str(root / "gallery.csv"), MODEL, g, _cfg())
    out1 = str(root / "n1")
    report1 = identify(g, str(root / "night1.csv"), out1, _cfg())
    return dict(
        root=root, zoo=zoo, gallery=g, build=build, out1=out1, report1=report1,
        copies=copies, night1=night1, night2=night2, new1=new1,
    )  # fmt: skip


def _results(out):
    from reid_ray import parts
    from reid_ray.gallery import RESULTS_SCHEMA

    return parts.read_parts(os.path.join(out, "results"), RESULTS_SCHEMA).to_pandas()


def _copy_gallery(world, tmp_path):
    dst = tmp_path / "G"
    shutil.copytree(world["gallery"], dst)
    return str(dst)


def test_build_writes_a_calibrated_first_version(world):
    from reid_ray.gallery import history, open_version, read_table

    v = open_version(world["gallery"])
    assert v.name == "v0001" and v.info["counts"] == {"images": 18, "identities": 6, "added": 18}
    assert v.model_ref == MODEL and v.info["model"]["embed"]["image_size"] == 64
    cal = v.calibration()
    assert cal["threshold"] == v.info["threshold"] and -1.0 <= cal["threshold"] <= 1.0
    assert read_table(v, ["image_id"]).num_rows == 18
    assert [h["version"] for h in history(world["gallery"])] == ["v0001"]
    with pytest.raises(OutputError, match="already holds a gallery"):
        from reid_ray.gallery import build_gallery

        build_gallery(str(world["root"] / "gallery.csv"), MODEL, world["gallery"], _cfg())


def test_night_one_results_errors_and_report(world):
    report = world["report1"]
    c = report["counts"]
    n_good = len(world["night1"]) - 2
    assert c["identified"] == n_good and c["known"] + c["new"] == n_good
    assert c["errors"] == 2 and c["already_in_gallery"] == 0
    res = _results(world["out1"])
    assert len(res) == n_good and res.image_id.is_unique
    assert set(res.decision) <= {"known", "new"}
    for copy in world["copies"]:  # identical images: known, the right individual
        row = res[res.image_id == copy["image_id"]].iloc[0]
        assert row.decision == "known" and row.identity == copy["identity"]
        assert row.top_score == pytest.approx(1.0, abs=1e-3) and row.confidence > 0.5
    new = res[res.decision == "new"]
    assert new.identity.str.startswith("new-n1-").all()
    from reid_ray import parts
    from reid_ray.data.manifest import ERRORS_SCHEMA

    errors = parts.read_parts(os.path.join(world["out1"], "errors"), ERRORS_SCHEMA).to_pandas()
    assert set(errors.image_id) == {"corrupt", "missing"}
    assert errors.reason.str.len().min() > 5
    sheet = os.path.join(world["out1"], "review.csv")
    review = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    assert {"image_id", "decision", "identity", "confidence", "candidate_1", "confidence_1",
            "accept"} <= set(review.columns)  # fmt: skip
    failed = review[review.proposed_decision == "error"]  # listed for reviewers, with reasons
    assert set(failed.image_id) == {"corrupt", "missing"} and (failed.reason != "").all()
    assert len(review) - len(failed) == n_good and (review.accept == "").all()
    ev = report["evaluation"]
    assert ev["n_labelled"] == n_good and 0.0 <= ev["decision_accuracy"] <= 1.0
    assert {"embed", "search", "decide", "group", "write", "total"} <= set(report["timings"])


def test_two_nights_grow_by_accepted_and_merge_is_idempotent(world, tmp_path):
    from reid_ray.gallery import history, identify, merge_results, open_version, set_current

    g = _copy_gallery(world, tmp_path)
    n1 = len(_results(world["out1"]))
    first = merge_results(g, world["out1"], _cfg())
    assert first["new_version"] and first["version"] == "v0002" and first["added"] == n1
    assert open_version(g).info["counts"]["images"] == 18 + n1
    again = merge_results(g, world["out1"], _cfg())
    assert not again["new_version"] and again["added"] == 0 and again["skipped_in_gallery"] == n1
    assert open_version(g).name == "v0002"

    # night 2: a copy of a night-1 new image now matches its provisional individual
    res1 = _results(world["out1"])
    new_row = res1[res1.decision == "new"].iloc[0]
    dst = world["zoo"] / "copy-of-new.jpg"
    shutil.copy(new_row.path, dst)
    night2 = pd.concat([world["night2"][["image_id", "path", "identity"]],
                        pd.DataFrame([{"image_id": "copy-of-new", "path": str(dst),
                                       "identity": None}])])  # fmt: skip
    manifest2 = tmp_path / "night2.csv"
    night2.to_csv(manifest2, index=False)
    out2 = str(tmp_path / "n2")
    report2 = identify(g, str(manifest2), out2, _cfg(night="n2"))
    assert report2["gallery_version"] == "v0002"
    res2 = _results(out2)
    row = res2[res2.image_id == "copy-of-new"].iloc[0]
    assert row.decision == "known" and row.identity == new_row.identity
    assert "decision_accuracy" in report2["evaluation"]

    # reviewers reject one row and correct another
    review = pd.read_csv(os.path.join(out2, "review.csv"), dtype=str, keep_default_na=False)
    review = review[review.proposed_decision != "error"].reset_index(drop=True)
    review["accept"] = "yes"  # an untouched row is not reviewed: never merged
    review.loc[0, "accept"] = "no"
    review.loc[1, "identity"] = "corrected-by-reviewer"
    reviewed = tmp_path / "reviewed.csv"
    review.to_csv(reviewed, index=False)
    third = merge_results(g, out2, _cfg(), reviewed=str(reviewed))
    assert third["version"] == "v0003" and third["added"] == len(review) - 1
    v3 = open_version(g)
    assert v3.info["counts"]["images"] == 18 + n1 + len(review) - 1
    from reid_ray.gallery import read_table

    table = read_table(v3, ["image_id", "identity"]).to_pandas().set_index("image_id")
    assert review.loc[0, "image_id"] not in table.index
    assert table.loc[review.loc[1, "image_id"], "identity"] == "corrected-by-reviewer"
    assert [h["version"] for h in history(g)] == ["v0001", "v0002", "v0003"]
    assert len(v3.info["merged"]) == 2

    set_current(g, "v0002")  # roll back
    assert open_version(g).info["counts"]["images"] == 18 + n1
    with pytest.raises(OutputError, match="no complete version"):
        set_current(g, "v0009")


@pytest.mark.parametrize("step", ["after-parts", "after-index", "before-current"])
def test_crash_mid_merge_leaves_the_previous_version(world, tmp_path, monkeypatch, step):
    from reid_ray.gallery import merge_results, open_version, read_table
    from reid_ray.gallery.store import FAIL_ENV
    from reid_ray.index import load_index, search

    g = _copy_gallery(world, tmp_path)
    monkeypatch.setenv(FAIL_ENV, step)
    with pytest.raises(RuntimeError, match="injected failure"):
        merge_results(g, world["out1"], _cfg())
    v = open_version(g)
    assert v.name == "v0001" and read_table(v, ["image_id"]).num_rows == 18
    index = load_index(v.index_folder())  # still usable
    emb = read_table(v, ["embedding"]).column("embedding").to_pylist()[:1]
    scores, _ = search(index, emb, 1)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    monkeypatch.delenv(FAIL_ENV)
    report = merge_results(g, world["out1"], _cfg())
    n1 = len(_results(world["out1"]))
    assert report["added"] == n1
    assert open_version(g).info["counts"]["images"] == 18 + n1


@pytest.mark.parametrize("step", ["after-embed", "after-results"])
def test_identify_crash_and_rerun_loses_and_duplicates_nothing(world, tmp_path, monkeypatch, step):
    from reid_ray import parts
    from reid_ray.gallery import identify
    from reid_ray.gallery.identification import FAIL_ENV

    out = str(tmp_path / "n1-again")
    manifest = str(world["root"] / "night1.csv")
    monkeypatch.setenv(FAIL_ENV, step)
    with pytest.raises(RuntimeError, match="injected failure"):
        identify(world["gallery"], manifest, out, _cfg())
    assert parts.read_run_record(out) is None  # incomplete, and it looks incomplete
    monkeypatch.delenv(FAIL_ENV)
    report = identify(world["gallery"], manifest, out, _cfg())
    assert report["counts"]["embedded_now"] == 0  # the embeddings were kept, not redone
    assert report["counts"]["embedded_before"] == report["counts"]["identified"]
    cols = ["image_id", "decision", "identity"]
    again = _results(out)[cols].sort_values("image_id").reset_index(drop=True)
    first = _results(world["out1"])[cols].sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(again, first)


def test_identify_refuses_another_model_and_skips_gallery_images(world, tmp_path):
    from reid_ray.gallery import identify

    with pytest.raises(ConfigError, match="was built with model"):
        identify(world["gallery"], str(world["root"] / "night1.csv"), str(tmp_path / "x"),
                 _cfg(), model_ref="timm-random:resnet18")  # fmt: skip
    report = identify(world["gallery"], str(world["root"] / "gallery.csv"),
                      str(tmp_path / "same"), _cfg())  # fmt: skip
    assert report["counts"]["already_in_gallery"] == 18 and report["counts"]["identified"] == 0


def test_boxes_are_kept_from_build_through_identify_and_merge(world, tmp_path):
    """Re-ranking crops every image to its box as the embedding did: the gallery and the
    results must keep the boxes, or gallery images are matched whole against cropped
    queries. An older gallery's parts (no box column) read as whole images."""
    from reid_ray.gallery import build_gallery, identify, merge_results, open_version, read_table
    from reid_ray.gallery.reranking import _manifest

    meta = pd.read_csv(world["zoo"] / "metadata.csv")
    meta["path"] = [str(world["zoo"] / p) for p in meta["path"]]
    meta["j"] = meta.groupby("identity").cumcount()
    known = sorted(meta["identity"].unique())[:4]
    cols = ["image_id", "path", "identity", "bbox"]
    meta[meta.identity.isin(known) & (meta.j < 3)][cols].to_csv(tmp_path / "g.csv", index=False)
    night = meta[meta.identity.isin(known) & (meta.j == 3)][cols].copy()
    night.loc[night.index[0], "bbox"] = None  # one whole image among boxed ones
    night.to_csv(tmp_path / "night.csv", index=False)
    box = {r.image_id: [float(v) for v in r.bbox.split(",")] if isinstance(r.bbox, str) else None
           for r in meta.itertuples()}  # fmt: skip
    box[night.image_id.iloc[0]] = None

    g = str(tmp_path / "G")
    build_gallery(str(tmp_path / "g.csv"), MODEL, g, _cfg())
    stored = read_table(open_version(g), ["image_id", "bbox"]).to_pylist()
    assert len(stored) == 12 and all(r["bbox"] == box[r["image_id"]] for r in stored)

    out = str(tmp_path / "n")
    identify(g, str(tmp_path / "night.csv"), out, _cfg())
    res = _results(out)
    assert {r.image_id: None if r.bbox is None else list(r.bbox) for r in res.itertuples()} == {
        i: box[i] for i in night.image_id
    }
    merge_results(g, out, _cfg())
    stored = read_table(open_version(g), ["image_id", "bbox"]).to_pylist()
    assert len(stored) == 16 and all(r["bbox"] == box[r["image_id"]] for r in stored)

    # what re-ranking reads for the gallery's images: their boxes
    ids = {r["image_id"] for r in stored}
    rows = _manifest(pa.table({"image_id": [], "path": []}, pa.schema([("image_id", pa.string()),
                     ("path", pa.string())])), open_version(g), ids).table.to_pylist()  # fmt: skip
    assert {r["image_id"]: r["bbox"] for r in rows} == {i: box[i] for i in ids}
    # the world's gallery was built from rows without boxes: whole images, no error
    old = read_table(open_version(world["gallery"]), ["bbox"]).column("bbox").to_pylist()
    assert old and all(b is None for b in old)
