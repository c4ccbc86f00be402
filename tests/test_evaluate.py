"""``evaluate`` end to end on a toy-zoo split with timm:resnet18 on the local Ray cluster:
metrics.json holds the keys README.md promises, agrees with a brute-force computation, the threshold
comes from the gallery alone (the known-vs-new decision), a second evaluate sharing the
embeddings folder embeds nothing, and re-ranking runs through ``rerank_candidates``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from reid_ray import io as rio
from reid_ray.errors import ConfigError

MODEL = "timm-random:resnet18"
SIZE = 64


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from reid_ray.synth import generate_zoo

    out = tmp_path_factory.mktemp("zoo")
    generate_zoo(str(out), species=2, individuals=16, images_per=6, size=64, seed=3)
    return out


@pytest.fixture(scope="module")
def evaluated(ray_cluster, zoo, tmp_path_factory):
    from reid_ray.evaluation import evaluate

    out = str(tmp_path_factory.mktemp("eval") / "out")
    metrics = evaluate(
        str(zoo / "metadata.csv"), str(zoo / "split.csv"), MODEL, out, image_size=SIZE
    )
    return out, metrics


def _tables(zoo):
    meta = pd.read_csv(zoo / "metadata.csv", dtype=str)
    split = pd.read_csv(zoo / "split.csv", dtype=str)
    return meta.merge(split, on="image_id")


def test_metrics_json_has_the_design_keys(evaluated, zoo):
    out, metrics = evaluated
    on_disk = rio.read_json(rio.join(out, "metrics.json"))
    for key in ("top1", "top5", "top20", "mAP", "baks", "baus", "threshold"):
        assert key in on_disk, key
        assert on_disk[key] is not None and np.isfinite(on_disk[key]), key
    for key in ("top1", "top5", "top20", "mAP", "baks", "baus"):
        assert 0.0 <= on_disk[key] <= 1.0
    assert on_disk["top1"] <= on_disk["top5"] <= on_disk["top20"]
    rows = _tables(zoo)
    counts = on_disk["counts"]
    for name in ("query", "gallery", "query_unknown"):
        assert counts[f"{name}_rows"] == int((rows.split == name).sum()) > 0
        assert counts[f"{name}_missing"] == 0
    assert on_disk["model"]["ref"] == MODEL and on_disk["model"]["fingerprint"]
    open_set = on_disk["open_set"]
    assert "No query is looked at" in open_set["method"]
    assert open_set["threshold"] == on_disk["threshold"] and open_set["n_known"] > 0
    assert open_set["n_known"] == open_set["n_unknown"]
    assert "leave-identity-out" in open_set["fitted_on"]  # timm: no held-out record
    assert 0.0 <= on_disk["auroc_known_unknown"] <= 1.0
    assert rio.read_bytes(on_disk["open_set_plot"])[:4] == b"\x89PNG"
    assert on_disk["timings"]["total_seconds"] > 0
    assert metrics["top1"] == on_disk["top1"]


def test_candidates_are_written_for_every_query(evaluated, zoo):
    from reid_ray.index import read_candidates

    out, metrics = evaluated
    rows = _tables(zoo)
    queries = set(rows.image_id[rows.split.isin(["query", "query_unknown"])])
    gallery = set(rows.image_id[rows.split == "gallery"])
    cand = read_candidates(out).to_pandas()
    assert set(cand.query_id) == queries
    assert set(cand.gallery_id) <= gallery
    k = min(100, len(gallery))
    assert (cand.groupby("query_id").size() == k).all()
    assert metrics["counts"]["candidates"] == len(queries) * k


def test_metrics_agree_with_brute_force(evaluated, zoo):
    """Recompute from the stored embeddings with dense numpy: same retrieval metrics, and
    the same threshold from the gallery alone (the queries play no part in it)."""
    from reid_ray.decide import (
        auroc,
        choose_samples,
        fit_decision,
        pairs_from_matrix,
        predict_with_threshold,
    )
    from reid_ray.embed import read_embeddings
    from reid_ray.evaluation.metrics import open_set_metrics, retrieval_metrics_from_similarity

    out, metrics = evaluated
    rows = _tables(zoo)
    identity = dict(zip(rows.image_id, rows.identity, strict=True))
    g_ids = rows.image_id[rows.split == "gallery"].tolist()
    q_ids = rows.image_id[rows.split == "query"].tolist()
    u_ids = rows.image_id[rows.split == "query_unknown"].tolist()
    emb = read_embeddings(rio.join(out, "embed"), ids=g_ids + q_ids + u_ids)
    vec = dict(zip(emb.ids.tolist(), emb.matrix, strict=True))
    G = np.stack([vec[i] for i in g_ids])
    g_ident = np.array([identity[i] for i in g_ids], dtype=object)

    Q = np.stack([vec[i] for i in q_ids])
    want = retrieval_metrics_from_similarity(Q @ G.T, [identity[i] for i in q_ids], g_ident)
    for key in ("top1", "top5", "top20", "mAP"):
        assert metrics[key] == pytest.approx(want[key], abs=1e-6), key

    # the decision from the dense gallery similarities: every other gallery image listed
    sim = G @ G.T
    others = np.array([[g for g in g_ids] for _ in g_ids], dtype=object)
    samples = choose_samples(pairs_from_matrix(g_ids, sim, others), g_ids, identity)
    decision = fit_decision(samples)
    threshold = decision.threshold
    assert metrics["threshold"] == pytest.approx(threshold, abs=1e-5)
    assert metrics["open_set"]["auroc"] == pytest.approx(decision.auroc, abs=1e-6)

    all_q = q_ids + u_ids
    S = np.stack([vec[i] for i in all_q]) @ G.T
    best = S.argmax(axis=1)
    predicted = predict_with_threshold(S.max(axis=1), g_ident[best], threshold)
    open_set = open_set_metrics([identity[i] for i in all_q], predicted, set(g_ident))
    assert metrics["baks"] == pytest.approx(open_set["baks"])
    assert metrics["baus"] == pytest.approx(open_set["baus"])
    n_q = len(q_ids)
    want_auroc = auroc(S[:n_q].max(axis=1), S[n_q:].max(axis=1))
    assert metrics["auroc_known_unknown"] == pytest.approx(want_auroc, abs=1e-6)


def test_shared_embeddings_and_reranking(evaluated, zoo, tmp_path):
    """A second evaluate into another folder that shares the first one's embeddings embeds
    nothing; re-ranking (SIFT + classical, through ``rerank_candidates``) gives the
    top-level metrics and its own known-vs-new decision on the calibrated probability,
    while the global metrics stay under ``global``."""
    from reid_ray.evaluation import evaluate
    from reid_ray.rerank import RerankConfig

    out, first = evaluated
    cfg = RerankConfig(extractor="sift", matcher="classical", top_k=5, resize_long_side=256)
    second = str(tmp_path / "second")
    metrics = evaluate(
        str(zoo / "metadata.csv"),
        str(zoo / "split.csv"),
        MODEL,
        second,
        image_size=SIZE,
        embed_dir=rio.join(out, "embed"),
        rerank=cfg,
    )
    embed_info = rio.read_json(rio.join(out, "embed", "manifest.json"))
    assert embed_info["counts"]["embedded"] == 0
    assert embed_info["counts"]["already_embedded"] == sum(
        first["counts"][f"{s}_rows"] for s in ("query", "gallery", "query_unknown")
    )
    assert not rio.exists(rio.join(second, "embed"))
    for key in ("top1", "top5", "top20", "mAP", "baks", "baus", "threshold"):
        assert metrics[key] is not None and np.isfinite(metrics[key]), key
    assert metrics["global"]["top1"] == pytest.approx(first["top1"])
    assert metrics["global"]["threshold"] == pytest.approx(first["threshold"])
    assert metrics["open_set"]["fitted_on"].startswith("re-ranking calibration pairs")
    # the decision applies to the global cosine or the fused probability, whichever the
    # simulation on the calibration pairs prefers, and says which (and why)
    gate = metrics["open_set"]["gate"]
    assert metrics["decision_score"] == gate
    assert set(metrics["open_set"]["info"]["gates"]) == {"global", "fused"}
    assert ("P(same)" if gate == "fused" else "cosine") in metrics["open_set"]["score"]
    gates = metrics["open_set"]["info"]["gates"]
    assert (gate == "fused") == (gates["fused"]["hmean"] > gates["global"]["hmean"] + 0.01)
    if gate == "fused":
        assert 0.0 <= metrics["threshold"] <= 1.0  # a probability
    assert metrics["open_set_plot"].endswith("open_set_rerank.png")
    assert metrics["rerank"]["stats"]["calibration"]["pairs"] > 0
    assert metrics["top5"] == pytest.approx(metrics["global"]["top5"])  # re-ranks the top-5


def test_bad_rerank_and_decision_arguments_fail_fast(zoo, tmp_path):
    from reid_ray.evaluation import evaluate

    args = (str(zoo / "metadata.csv"), str(zoo / "split.csv"), MODEL, str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="rerank must be True or a RerankConfig"):
        evaluate(*args, rerank="sift")
    with pytest.raises(ConfigError, match="decision must be a DecisionConfig"):
        evaluate(*args, decision={"rule": "balanced"})


def test_split_without_gallery_fails_fast(zoo, tmp_path):
    from reid_ray.evaluation import evaluate

    split = pd.read_csv(zoo / "split.csv", dtype=str)
    split = split[split.split != "gallery"]
    path = tmp_path / "no_gallery.csv"
    split.to_csv(path, index=False)
    with pytest.raises(ConfigError, match="0 gallery"):
        evaluate(str(zoo / "metadata.csv"), str(path), MODEL, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="split file not found"):
        evaluate(str(zoo / "metadata.csv"), str(tmp_path / "nope.csv"), MODEL, str(tmp_path / "o"))


def test_cli_reports_bad_arguments_in_one_line(zoo, tmp_path):
    """The commands are registered and a user error is one message with exit status 2."""
    cmd = [sys.executable, "-m", "reid_ray.cli"]
    missing = subprocess.run(
        cmd
        + [
            "evaluate",
            "--manifest",
            str(tmp_path / "none.csv"),
            "--model",
            MODEL,
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "manifest not found" in missing.stderr
    bad_device = subprocess.run(
        cmd
        + [
            "embed",
            "--manifest",
            str(zoo / "metadata.csv"),
            "--model",
            MODEL,
            "--out",
            str(tmp_path / "o"),
            "--device",
            "tpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad_device.returncode == 2 and "device must be one of" in bad_device.stderr
    for name in ("embed", "index", "search", "evaluate"):
        help_ = subprocess.run(cmd + [name, "--help"], capture_output=True, text=True, timeout=300)
        assert help_.returncode == 0 and "--out" in help_.stdout, name


def test_index_and_search_commands_on_the_evaluate_embeddings(evaluated, zoo, tmp_path):
    """`reid-ray index` + `reid-ray search` over the cached embeddings give the same top-5
    candidates as evaluate's own search."""
    from reid_ray.index import read_candidates

    out, _ = evaluated
    cmd = [sys.executable, "-m", "reid_ray.cli"]
    common = ["--manifest", str(zoo / "metadata.csv"), "--split", str(zoo / "split.csv")]
    idx, cand = str(tmp_path / "index"), str(tmp_path / "cand")
    built = subprocess.run(
        cmd + ["index", "--embeddings", rio.join(out, "embed"), "--out", idx] + common,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    searched = subprocess.run(
        cmd
        + [
            "search",
            "--index",
            idx,
            "--embeddings",
            rio.join(out, "embed"),
            "--out",
            cand,
            "--k",
            "5",
        ]
        + common,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert searched.returncode == 0, searched.stderr
    mine = read_candidates(cand).to_pandas().sort_values(["query_id", "rank"])
    theirs = read_candidates(out).to_pandas().query("rank <= 5").sort_values(["query_id", "rank"])
    assert mine.query_id.tolist() == theirs.query_id.tolist()
    assert mine.gallery_id.tolist() == theirs.gallery_id.tolist()
    np.testing.assert_allclose(mine.score.to_numpy(), theirs.score.to_numpy(), atol=1e-6)


def test_demo_report_leads_with_the_full_system():
    """The demo's report and metrics rows: the full system first, then each stage."""
    from reid_ray.demo import FULL_SYSTEM, Row, _row_dict, render_report

    def metrics(top1):
        return {"top1": top1, "top5": 1.0, "mAP": top1, "baks": 0.8, "baus": 0.7,
                "threshold": 0.5, "auroc_known_unknown": 0.9,
                "open_set": {"threshold": 0.5, "score": "p", "rule": "balanced",
                             "fitted_on": "gallery", "n_known": 10, "n_unknown": 10,
                             "auroc": 0.95, "message": "separable"},
                "open_set_plot": "/o/eval/trained/open_set_rerank.png"}  # fmt: skip

    rows = [Row("untrained", "baseline", "m0", metrics(0.1), 1.0),
            Row("trained", "training", "ckpt", metrics(0.5), 2.0),
            Row(FULL_SYSTEM, "re-ranking + decision", "ckpt", metrics(0.9), 3.0)]  # fmt: skip
    results = {"zoo": {"images": 10, "individuals": 2, "species": 1, "seconds": 0.1},
               "seed": 0, "preset": "tiny", "seconds": 5.0,
               "machine": {"cpus": 2, "ray_resources": {"CPU": 2.0}},
               "stages": {}}  # fmt: skip
    report = render_report(results, rows, rows[-1], "/o")
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[1].startswith(f"| **{FULL_SYSTEM}**") and "0.900" in table[1]
    assert table[2].startswith("| untrained") and table[3].startswith("| trained")
    assert "](eval/trained/open_set_rerank.png)" in report
    record = _row_dict(rows[-1])
    assert record["top1"] == 0.9 and record["open_set"]["fitted_on"] == "gallery"
