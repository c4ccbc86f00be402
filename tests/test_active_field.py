"""The field round trip of ``reid-ray al``: a programme's own images with NO identity column
and no split, a person answering on the annotation page over HTTP in several sittings (a
hand-written ``Same``, a skip, two writers at once), three rounds that each hold their own
answers once, the pseudo-labelled manifest, and ``gallery build`` on it (real Ray, real
images, a tiny real model, the real CLI; slow)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_ANSWERS_NEEDED = 3


def _env(address=""):
    # as tests/test_active_run.py: no memory monitor on a machine shared with other jobs
    return dict(os.environ, RAY_ADDRESS=address, RAY_DATA_DISABLE_PROGRESS_BARS="1",
                RAY_memory_monitor_refresh_ms="0", COLUMNS="200")  # fmt: skip


def _cli(*args, timeout=900, address=""):
    return subprocess.run([sys.executable, "-m", "reid_ray.cli", *args], env=_env(address),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_annotate_without_pairs_is_one_line_and_help_names_the_human_oracle(tmp_path):
    done = _cli("al", "--annotate", str(tmp_path), timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "holds no pairs.csv" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    help_text = _cli("al", "--help", timeout=300).stdout
    for needle in ("--oracle", "human", "--annotate", "--accept-partial", "status 3"):
        assert needle in help_text, needle


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """A toy zoo as a programme has it: image_id, path and box only (the truth kept aside
    for the person answering)."""
    from reid_ray.synth import generate_zoo

    root = tmp_path_factory.mktemp("fieldzoo")
    s = generate_zoo(str(root), species=2, individuals=16, images_per=6, size=48, seed=5)
    with open(s.metadata_path) as f:
        rows = list(csv.DictReader(f))
    truth = {r["image_id"]: r["identity"] for r in rows}
    manifest = os.path.join(str(root), "field.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", "bbox"])
        for r in rows:
            w.writerow([r["image_id"], r["path"], r["bbox"]])
    return {"manifest": manifest, "truth": truth, "root": str(root)}


def _get_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url, pair_id, answer):
    body = json.dumps({"pair_id": pair_id, "answer": answer}).encode()
    req = urllib.request.Request(url + "api/answer", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _truthful(truth, pair):
    return "same" if truth[pair["image_id_a"]] == truth[pair["image_id_b"]] else "different"


@pytest.mark.slow
@pytest.mark.timeout(3000)  # three rounds of embed + train on a shared, loaded machine
def test_field_round_trip_without_identities(field, tmp_path, ray_cluster):
    from reid_ray.active.annotate import PageServer

    # every command joins the session's cluster, as a user's commands join theirs (seven
    # commands each starting Ray would mostly measure Ray's start on a loaded machine)
    address = ray_cluster.get_runtime_context().gcs_address

    def cli(*args):
        return _cli(*args, address=address)

    out = str(tmp_path / "al")
    cmd = ["al", "--manifest", field["manifest"], "--out", out, "--oracle", "human",
           "--model", "timm-random:resnet18", "--image-size", "32", "--sampler", "aas",
           "--budget", "12", "--rounds", "3", "--epochs", "1"]  # fmt: skip
    r0 = os.path.join(out, "rounds", "r0")

    # the run writes round 0's pairs and waits: a normal outcome, its own status
    first = cli(*cmd)
    assert first.returncode == EXIT_ANSWERS_NEEDED, first.stderr[-3000:]
    assert "0 of 4 pairs answered" in first.stdout and "error:" not in first.stderr
    with open(os.path.join(r0, "pairs.csv")) as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 4 and all(p["bbox_a"] and p["thumbnail"] for p in pairs)

    # sitting 1: a hand-written answer in the wrong case, then the page (found from --out)
    with open(os.path.join(r0, "answers.csv"), "w") as f:
        f.write(f"pair_id,answer\n{pairs[0]['pair_id']},Same\n")
    page = PageServer(out)
    try:
        assert page.folder == r0
        state = _get_json(page.url + "api/state")
        assert state["answers"] == {pairs[0]["pair_id"]: "same"}  # the page sees it
        assert "reid-ray al" in state["next"] and "--oracle human" in state["next"]
        _post(page.url, pairs[1]["pair_id"], "skip")
    finally:
        page.stop()
    waiting = cli(*cmd)
    assert waiting.returncode == EXIT_ANSWERS_NEEDED, waiting.stderr[-3000:]
    assert "2 of 4 pairs answered" in waiting.stdout

    # sitting 2: two tabs answer at once; nothing is lost, the hand-written answer included
    page = PageServer(out)
    try:
        barrier = threading.Barrier(2)

        def tab(pair):
            barrier.wait()
            _post(page.url, pair["pair_id"], _truthful(field["truth"], pair))

        tabs = [threading.Thread(target=tab, args=(p,)) for p in pairs[2:]]
        for t in tabs:
            t.start()
        for t in tabs:
            t.join(60)
        assert len(_get_json(page.url + "api/state")["answers"]) == 4
    finally:
        page.stop()
    with open(os.path.join(r0, "answers.csv")) as f:  # complete: the page wrote it
        saved = dict(csv.reader(f))
    assert saved[pairs[0]["pair_id"]] == "same" and saved[pairs[1]["pair_id"]] == "skip"
    assert len(saved) == 5  # header + 4

    # rounds 1 and 2: one sitting each, truthful answers
    for k in (1, 2):
        step = cli(*cmd)
        assert step.returncode == EXIT_ANSWERS_NEEDED, step.stderr[-3000:]
        page = PageServer(out)
        try:
            rows = json.loads(json.dumps(_get_json(page.url + "api/state")["pairs"]))
            assert rows and rows[0]["pair_id"].startswith(f"r{k}-")
            for p in rows:
                _post(page.url, p["pair_id"], _truthful(field["truth"], p))
        finally:
            page.stop()
    done = cli(*cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gallery build" in done.stdout  # what to run next

    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["evaluation"].startswith("no labelled query/gallery rows")
    assert metrics["mAP"] is None and metrics["nmi"] is None  # no labels: skipped, not faked
    records = [json.load(open(os.path.join(out, "rounds", f"r{k}", "round.json")))
               for k in range(3)]  # fmt: skip
    # each round holds its own answers once; the skip spent nothing and moved on
    assert records[0]["answers"]["skip"] == 1 and len(records[0]["asked"]) == 3
    asked = [tuple(p) for r in records for p in r["asked"]]
    assert len(asked) == len(set(asked)) == metrics["budget_pairs"]
    assert [r["annotations"] for r in records] == [
        sum(len(r["asked"]) for r in records[: k + 1]) for k in range(3)
    ]
    assert metrics["budget_pairs"] == 12 - sum(r["pairs_open"] for r in records)
    with open(metrics["constraints"]) as f:
        constraints = list(csv.DictReader(f))
    assert len(constraints) == metrics["budget_pairs"]
    assert {c["answer"] for c in constraints} <= {"same", "different", "unsure"}

    # the pseudo-labelled manifest: a provisional identity for every image
    with open(metrics["pseudo_labels"]) as f:
        labelled = list(csv.DictReader(f))
    assert {r["image_id"] for r in labelled} == set(field["truth"])
    assert all(r["identity"] for r in labelled) and all(r["bbox"] for r in labelled)
    from reid_ray.data import read_manifest
    from reid_ray.train.rows import select_training_rows

    train_rows, _, _ = select_training_rows(read_manifest(metrics["pseudo_labels"]))
    assert train_rows.num_rows > 0  # `reid-ray train` takes its clusters

    gallery = str(tmp_path / "gallery")
    built = cli("gallery", "build", "--manifest", metrics["pseudo_labels"],
                 "--model", metrics["checkpoint"], "--out", gallery)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    assert "identities" in built.stdout
