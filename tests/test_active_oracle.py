"""Oracles: the simulated one, the human round trip (pairs file, thumbnails, a hand-written
answers file with bad rows) and the annotation page over HTTP against the real server."""

from __future__ import annotations

import csv
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from reid_ray.active.oracle import (
    SimulatedOracle,
    read_answers,
    read_pairs_file,
    write_pairs_file,
)
from reid_ray.errors import ConfigError


def test_simulated_oracle_reads_identities_only():
    oracle = SimulatedOracle(["a", "a", "b", None])
    assert oracle([(0, 1), (0, 2), (2, 3)]) == ["same", "different", "unsure"]
    assert oracle.asked == 3


@pytest.fixture()
def pairs_dir(tmp_path):
    rng = np.random.default_rng(0)
    paths, ids = [], []
    for i in range(6):  # real files of different shapes and modes
        p = tmp_path / "img" / f"im{i}.{'png' if i % 2 else 'jpg'}"
        p.parent.mkdir(exist_ok=True)
        shape = (40 + 10 * i, 60, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(p)
        paths.append(str(p))
        ids.append(f"im{i}")
    paths[5] = str(tmp_path / "img" / "missing.jpg")  # one image that cannot be read
    folder = str(tmp_path / "round-0")
    pairs = [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5)]
    counts = write_pairs_file(folder, pairs, ids, paths, round_index=0)
    return tmp_path, folder, counts


def test_pairs_file_has_columns_and_side_by_side_thumbnails(pairs_dir):
    _, folder, counts = pairs_dir
    assert counts == {"pairs": 5, "thumbnail_errors": 1}
    rows = read_pairs_file(f"{folder}/pairs.csv")
    assert list(rows[0]) == [
        "pair_id", "image_id_a", "path_a", "image_id_b", "path_b", "thumbnail", "bbox_a", "bbox_b",
    ]  # fmt: skip
    assert [r["pair_id"] for r in rows] == [f"r0-{k:05d}" for k in range(5)]
    with Image.open(f"{folder}/{rows[0]['thumbnail']}") as im:
        assert im.width > 2 * im.height - 20  # two squares side by side
    assert rows[4]["thumbnail"] == ""  # the unreadable image: no thumbnail, row kept


def test_hand_written_answers_with_bad_rows_are_all_reported(pairs_dir):
    _, folder, _ = pairs_dir
    pairs = read_pairs_file(f"{folder}/pairs.csv")
    answers = f"{folder}/answers.csv"
    with open(answers, "w") as f:
        f.write(
            "pair_id,answer\n"
            "r0-00000,same\n"  # im0 = im1
            "r0-00001,Same\n"  # im1 = im2 (case does not matter)
            "r0-00002,different\n"  # im0 != im2: contradicts the two above
            "r0-00003,maybe\n"  # bad value
            "r0-00003,d\n"  # fixed on a later line (alias)
            "r0-00003,d\n"  # duplicate, same answer
            "r9-99999,same\n"  # unknown pair id
            "r0-00000,same,extra\n"  # malformed
            "\n"  # empty line
        )
    report = read_answers(answers, pairs)
    c = report.counts()
    assert c["same"] == 2 and c["different"] == 2 and c["unsure"] == 0
    assert c["bad_values"] == 1 and report.bad_values[0]["line"] == 5
    assert c["duplicates"] == 1 and report.duplicates[0]["line"] == 7
    assert c["unknown_pair_ids"] == 1 and report.unknown_ids[0]["pair_id"] == "r9-99999"
    assert c["malformed_rows"] == 2
    assert report.unanswered == ["r0-00004"]
    assert report.contradictions == [
        {"cannot_pair": "r0-00002", "must_pairs": ["r0-00000", "r0-00001"]}
    ]
    assert not report.ok
    text = "\n".join(report.lines())
    for needle in ("r9-99999", "bad answer 'maybe'", "contradiction", "r0-00004", "line 9"):
        assert needle in text
    # every data row is accounted for: 4 used (lines 2, 3, 4, 6) + the problems
    problems = ("duplicates", "bad_values", "unknown_pair_ids", "malformed_rows")
    assert c["rows"] == 9 == 4 + sum(c[k] for k in problems)


def test_conflicting_duplicates_are_not_used(pairs_dir):
    _, folder, _ = pairs_dir
    pairs = read_pairs_file(f"{folder}/pairs.csv")
    path = f"{folder}/answers.csv"
    with open(path, "w") as f:
        f.write("pair_id,answer\nr0-00000,same\nr0-00000,different\nr0-00001,unsure\n")
    report = read_answers(path, pairs)
    assert report.conflicting == [
        {"pair_id": "r0-00000", "answers": ["different", "same"], "lines": [2, 3]}
    ]
    assert "r0-00000" not in report.answers and report.answers["r0-00001"] == "unsure"
    assert "r0-00000" not in report.unanswered


def test_answers_file_without_header_is_refused(pairs_dir):
    _, folder, _ = pairs_dir
    path = f"{folder}/answers.csv"
    with open(path, "w") as f:
        f.write("r0-00000,same\n")
    with pytest.raises(ConfigError, match="header"):
        read_answers(path, read_pairs_file(f"{folder}/pairs.csv"))


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def _post(url, obj):
    req = urllib.request.Request(
        url, data=json.dumps(obj).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_annotation_page_end_to_end_over_http(pairs_dir):
    from reid_ray.active.annotate import PageServer

    _, folder, _ = pairs_dir
    server = PageServer(folder)  # 127.0.0.1, a free port
    try:
        assert server.url.startswith("http://127.0.0.1:")
        status, ctype, body = _get(server.url)
        assert status == 200 and "text/html" in ctype
        assert b"keydown" in body and b"'s'" in body and b"'d'" in body and b"'u'" in body
        state = json.loads(_get(server.url + "api/state")[2])
        assert len(state["pairs"]) == 5 and state["answers"] == {}
        status, ctype, jpg = _get(server.url + "thumbs/r0-00000")
        assert ctype == "image/jpeg" and jpg[:2] == b"\xff\xd8"
        assert _post(server.url + "api/answer", {"pair_id": "r0-00000", "answer": "same"}) == {
            "answered": 1, "total": 5, "answers": {"r0-00000": "same"},
        }  # fmt: skip
        for mode in ("zoom", "frame"):  # one animal large, or the whole frame
            status, ctype, jpg = _get(server.url + f"view/r0-00000/b?mode={mode}")
            assert ctype == "image/jpeg" and jpg[:2] == b"\xff\xd8"
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(server.url + "view/r0-00004/b?mode=zoom")  # the unreadable image: why, not a crash
        assert err.value.code == 404 and b"could not be shown" in err.value.read()
        # one writer per folder: a second page on it is refused
        with pytest.raises(ConfigError, match="another annotation page"):
            PageServer(folder)
        _post(server.url + "api/answer", {"pair_id": "r0-00003", "answer": "d"})
        _post(server.url + "api/answer", {"pair_id": "r0-00000", "answer": "unsure"})  # change
        for bad in ({"pair_id": "nope", "answer": "same"}, {"pair_id": "r0-00001", "answer": "?"}):
            with pytest.raises(urllib.error.HTTPError) as err:
                _post(server.url + "api/answer", bad)
            assert err.value.code == 400
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(server.url + "thumbs/r0-00004")  # the pair without a thumbnail
        assert err.value.code == 404
    finally:
        server.stop()
    # the page wrote its partial answers file (not answers.csv: 2 of 5 pairs are answered)
    import os

    assert not os.path.exists(f"{folder}/answers.csv")
    with open(f"{folder}/answers.partial.csv") as f:
        assert list(csv.reader(f)) == [
            ["pair_id", "answer"], ["r0-00000", "unsure"], ["r0-00003", "different"],
        ]  # fmt: skip
    report = read_answers(f"{folder}/answers.partial.csv", read_pairs_file(f"{folder}/pairs.csv"))
    assert report.answers == {"r0-00000": "unsure", "r0-00003": "different"}
    # a restarted page continues from the saved answers
    again = PageServer(folder)
    try:
        assert json.loads(_get(again.url + "api/state")[2])["answers"] == report.answers
    finally:
        again.stop()


def test_human_round_waits_for_every_answer_then_reads_its_own_pairs_file(pairs_dir):
    from reid_ray.active.config import ALConfig
    from reid_ray.active.runner import AnswersNeeded, _ask

    tmp, _, _ = pairs_dir
    ids = [f"im{i}" for i in range(5)]
    paths = [str(tmp / "img" / f"im{i}.{'png' if i % 2 else 'jpg'}") for i in range(5)]
    cfg = ALConfig(manifest="m.csv", out=str(tmp / "al"), oracle="human")
    rdir = str(tmp / "al" / "r0")
    with pytest.raises(AnswersNeeded, match="0 of 3 pairs answered"):
        _ask(cfg, rdir, 0, [(0, 1), (2, 3), (1, 4)], ids, paths, identities={})
    with open(f"{rdir}/answers.csv", "w") as f:
        f.write("pair_id,answer\nr0-00000,Same\nr0-00001,bogus\nr0-00002,skip\n")
    # a bad answer is no answer: the round still waits (it never trains on partial answers)
    with pytest.raises(AnswersNeeded, match="2 of 3 pairs answered") as waiting:
        _ask(cfg, rdir, 0, [(3, 4)], ids, paths, identities={})
    assert waiting.value.folder == rdir and "--annotate" in waiting.value.status
    # unless told to go on: the open pair comes back as None (spends no budget)
    got = _ask(cfg, rdir, 0, [(3, 4)], ids, paths, identities={}, accept_partial=True)
    assert got == [("im0", "im1", "same"), ("im2", "im3", None), ("im1", "im4", "skip")]
    # the page's partial file completes it (and wins over the hand-written file)
    with open(f"{rdir}/answers.partial.csv", "w") as f:
        f.write("pair_id,answer\nr0-00001,d\nr0-00002,unsure\n")
    got = _ask(cfg, rdir, 0, [(3, 4)], ids, paths, identities={})
    assert got == [("im0", "im1", "same"), ("im2", "im3", "different"), ("im1", "im4", "unsure")]
