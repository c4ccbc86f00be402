"""The nightly job with local-feature re-ranking, end to end on a toy zoo: gallery build,
identify with ``rerank.enabled`` (SIFT + the classical matcher: no weights), the fused
probabilities in the results and in the decision, a gallery image that cannot be read
recorded as an error, the fusion stored with the gallery version and reused on a rerun,
and a gallery without image paths refused before any work.

Real parts only: the session's local Ray cluster, real JPEG files, EfficientNet-Lite0.
"""

from __future__ import annotations

import os

import pandas as pd
import pytest

from reid_ray.errors import ConfigError

MODEL = "timm:efficientnet_lite0"
pytestmark = pytest.mark.slow


def _cfg(rerank_yaml, **extra):
    from reid_ray.gallery import load_nightly_config

    return load_nightly_config(
        {
            "embed": {"image_size": 64},
            "night": "r1",
            "calibration": {"k": 20},
            "rerank": {"enabled": True, "config": str(rerank_yaml)},
            **extra,
        }
    )


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory):
    from reid_ray.gallery import build_gallery
    from reid_ray.synth import generate_zoo

    root = tmp_path_factory.mktemp("nightly-rerank")
    zoo = root / "zoo"
    generate_zoo(str(zoo), species=2, individuals=8, images_per=4, size=96, seed=5)
    meta = pd.read_csv(zoo / "metadata.csv")
    meta["path"] = [str(zoo / p) for p in meta["path"]]
    meta["j"] = meta.groupby("identity").cumcount()
    ids = sorted(meta["identity"].unique())
    known, new = ids[:6], ids[6:]
    gallery = meta[meta.identity.isin(known) & (meta.j < 3)]
    night = pd.concat([meta[meta.identity.isin(known) & (meta.j == 3)],
                       meta[meta.identity.isin(new)]])  # fmt: skip
    cols = ["image_id", "path", "identity"]
    gallery[cols].to_csv(root / "gallery.csv", index=False)
    night[cols].to_csv(root / "night.csv", index=False)
    rerank_yaml = root / "rerank.yaml"
    rerank_yaml.write_text(
        "extractor: sift\nmatcher: classical\nmax_keypoints: 200\nresize_long_side: 160\n"
        "calibration_queries: 18\nmin_negatives: 10\n"
    )
    g = str(root / "G")
    build_gallery(str(root / "gallery.csv"), MODEL, g, _cfg(rerank_yaml))
    # a gallery image whose file is damaged after the build: re-ranking must record it
    broken = gallery.iloc[0]
    with open(broken.path, "wb") as fh:
        fh.write(b"not an image any more")
    return dict(root=root, gallery=g, night=night, broken=broken.image_id, yaml=rerank_yaml)


def _results(out):
    from reid_ray import parts
    from reid_ray.gallery import RESULTS_SCHEMA

    return parts.read_parts(os.path.join(out, "results"), RESULTS_SCHEMA).to_pandas()


def test_identify_with_rerank_decides_by_the_chosen_score(world):
    from reid_ray import parts
    from reid_ray.data.manifest import ERRORS_SCHEMA
    from reid_ray.gallery import identify, open_version

    out = str(world["root"] / "r1")
    report = identify(world["gallery"], str(world["root"] / "night.csv"), out, _cfg(world["yaml"]))
    rr = report["rerank"]
    assert rr["extractor"] == "sift" and rr["fusion_source"].startswith("fitted now")
    # the global cosine or the fused probability decides, whichever the gallery's
    # simulation preferred; the report says which and shows both
    gate = report["decision"]["gate"]
    assert gate == rr["decision_gate"] in ("global", "fused")
    assert set(rr["simulated_gates"]) == {"global", "fused"}
    assert report["decision"]["score"] == (
        "top-1 calibrated fused probability" if gate == "fused" else "best global cosine"
    )
    threshold = report["decision"]["threshold"]
    assert threshold == rr["threshold"] and -1.0 <= threshold <= 1.0
    # new images are grouped by the same decision, on pairs scored like candidates
    if report["counts"]["new"] >= 2:
        assert report["grouping"]["gate"] == gate and report["grouping"]["pairs"] > 0
    assert rr["calibration"]["queries"] >= 10 and rr["pairs_scored"] > 0
    assert "rerank" in report["timings"]

    res = _results(out)
    n = len(world["night"])
    assert len(res) == n and res.reranked.all()
    for r in res.itertuples():
        fused, probs = list(r.cand_fused_scores), list(r.cand_probabilities)
        assert len(fused) == len(probs) == len(r.cand_identities) == len(r.cand_images) >= 1
        assert fused == sorted(fused, reverse=True)  # candidates follow the fused order
        assert r.confidence == probs[0]
        gated = r.confidence if gate == "fused" else max(r.cand_scores)
        assert (r.decision == "known") == (gated >= threshold)  # the chosen decision
        if r.decision == "known":
            assert r.identity == r.cand_identities[0]
    assert res.cand_local_scores.map(lambda v: any(x == x for x in v if x is not None)).any()

    # the damaged gallery image: recorded with its reason and counted, nothing dropped
    errors = parts.read_parts(os.path.join(out, "errors"), ERRORS_SCHEMA).to_pandas()
    bad = errors[errors.image_id == world["broken"]]
    assert len(bad) >= 1 and bad.reason.str.len().min() > 5
    assert report["counts"]["rerank_errors"] >= 1 and rr["errors"] >= 1
    assert report["counts"]["errors"] == len(errors)

    ev = report["evaluation"]
    assert ev["n_labelled"] == n and 0.0 <= ev["decision_accuracy"] <= 1.0
    assert ev["n_truly_known"] == 6 and ev["n_truly_new"] == 8
    # the fusion is stored with the gallery version and reused: a rerun decides the same
    assert rr["fusion"].startswith(open_version(world["gallery"]).folder)
    again = identify(world["gallery"], str(world["root"] / "night.csv"), out, _cfg(world["yaml"]))
    assert again["rerank"]["fusion_source"] == "stored with the gallery version"
    assert again["rerank"]["pairs_scored"] == 0  # resumed from the stored scores
    cols = ["image_id", "decision", "identity", "confidence"]
    pd.testing.assert_frame_equal(_results(out)[cols], res[cols])


def test_rerank_refuses_a_gallery_without_image_paths(world, tmp_path):
    import shutil

    import numpy as np

    from reid_ray.gallery import identify, open_version
    from reid_ray.gallery.build import calibrator
    from reid_ray.gallery.store import gallery_table, write_version

    g = tmp_path / "G"
    shutil.copytree(world["gallery"], g)
    v = open_version(str(g))
    dim = v.info["model"]["embedding_dim"]
    x = np.eye(4, dim, dtype=np.float32)
    rows = gallery_table([f"vec-{i}" for i in range(4)], ["vec-a", "vec-a", "vec-b", "vec-b"],
                         x, v.key, [None] * 4, "", "test")  # fmt: skip
    write_version(str(g), rows, parent=v, model=v.info["model"],
                  calibrate=calibrator(_cfg(world["yaml"]), v.info["model"]["ref"]),
                  operation="merge")  # fmt: skip
    with pytest.raises(ConfigError, match="stores no image path for 4 of"):
        identify(str(g), str(world["root"] / "night.csv"), str(tmp_path / "out"),
                 _cfg(world["yaml"]))  # fmt: skip
    assert not os.path.exists(tmp_path / "out" / "embed")  # refused before any work
