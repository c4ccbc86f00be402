"""The review page for a night, over HTTP against the real server on 127.0.0.1.

A real identify output (a tiny toy-zoo gallery and night on the session's Ray cluster, the
offline EfficientNet-Lite0 at 64 px, a corrupt image among the night's), reviewed in two
sittings with two concurrent writers and one decision of every kind; the reviewed CSV is
then validated by ``reid-ray review --check`` and merged by ``reid-ray gallery merge
--reviewed`` (the real commands, in a subprocess).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pandas as pd
import pytest

from reid_ray.errors import ConfigError

MODEL = "timm:efficientnet_lite0"
pytestmark = pytest.mark.slow


def _cfg():
    from reid_ray.gallery import load_nightly_config

    return load_nightly_config(
        {"embed": {"image_size": 64}, "night": "n1", "calibration": {"k": 10}}
    )


@pytest.fixture(scope="module")
def night(ray_cluster, tmp_path_factory):
    """A gallery of 4 individuals (2 images each) and a night of 4 known + 2 new animals."""
    from reid_ray.gallery import build_gallery, identify
    from reid_ray.synth import generate_zoo

    root = tmp_path_factory.mktemp("review")
    zoo = root / "zoo"
    generate_zoo(str(zoo), species=2, individuals=6, images_per=3, size=64, seed=7)
    meta = pd.read_csv(zoo / "metadata.csv")
    meta["path"] = [str(zoo / p) for p in meta["path"]]
    meta["j"] = meta.groupby("identity").cumcount()
    ids = sorted(meta["identity"].unique())
    known = ids[:4]
    gallery = meta[meta.identity.isin(known) & (meta.j < 2)]
    (zoo / "corrupt.jpg").write_bytes(b"not a JPEG")
    night = pd.concat(
        [
            meta[meta.identity.isin(known) & (meta.j == 2)],
            meta[~meta.identity.isin(known)],
            pd.DataFrame([{"image_id": "corrupt", "path": str(zoo / "corrupt.jpg")}]),
        ]
    )
    cols = ["image_id", "path", "identity"]
    gallery[cols].to_csv(root / "gallery.csv", index=False)
    night[["image_id", "path"]].to_csv(root / "night.csv", index=False)
    g = str(root / "G")
    build_gallery(str(root / "gallery.csv"), MODEL, g, _cfg())
    out = str(root / "n1")
    identify(g, str(root / "night.csv"), out, _cfg())
    return dict(root=root, gallery=g, out=out, known=known, n_night=len(night) - 1)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def _post(url: str, body: dict) -> tuple[int, dict | str]:
    req = urllib.request.Request(
        url + "api/decide", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _state(url: str) -> dict:
    return json.loads(_get(url + "api/state")[2])


def _rows(path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["image_id"]: r for r in csv.DictReader(fh)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "reid_ray.cli", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_identify_writes_a_sheet_nothing_accepted_failed_images_listed(night):
    from reid_ray.gallery import open_version, read_table

    rows = _rows(os.path.join(night["out"], "review.csv"))
    assert len(rows) == night["n_night"] + 1  # every identified image and the corrupt one
    assert all(r["accept"] == "" for r in rows.values())  # untouched: never merged
    assert rows["corrupt"]["proposed_decision"] == "error" and rows["corrupt"]["reason"]
    paths = dict(
        read_table(open_version(night["gallery"]), ["image_id", "path"]).to_pandas().values
    )
    for r in rows.values():
        if r["proposed_decision"] == "error":
            continue
        assert r["candidate_1_image"] in paths  # a gallery image id, and its file beside it
        assert r["candidate_1_path"] == paths[r["candidate_1_image"]]
        top = float(r["confidence_1"])
        want = top if r["proposed_decision"] == "known" else 1 - top
        assert float(r["confidence"]) == pytest.approx(want, abs=2e-4)


def test_review_two_sittings_two_writers_every_decision_then_merge(night, tmp_path):
    from reid_ray.gallery import open_version, read_table
    from reid_ray.review.server import ReviewServer

    out = str(tmp_path / "n1")
    shutil.copytree(night["out"], out)
    gallery = str(tmp_path / "G")
    shutil.copytree(night["gallery"], gallery)
    with open(os.path.join(out, "manifest.json")) as fh:  # the copy's record names the copy
        record = json.load(fh)
    record["gallery"] = gallery
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(record, fh)

    # first sitting
    server = ReviewServer(out)
    try:
        with pytest.raises(ConfigError, match="another review server"):
            ReviewServer(out)  # one writer per night
        url = server.url
        status, ctype, body = _get(url)
        assert status == 200 and "text/html" in ctype and b"new individual" in body
        s = _state(url)
        items = [i["image_id"] for i in s["items"]]
        assert s["total"] == night["n_night"] == len(items) and s["reviewed"] == 0
        assert [f["image_id"] for f in s["failed"]] == ["corrupt"]
        first = s["items"][0]
        status, ctype, jpeg = _get(url + f"image?kind=night&id={first['image_id']}&h=200")
        assert status == 200 and ctype == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
        cand = first["candidates"][0]["image_id"]
        assert _get(url + f"image?kind=gallery&id={cand}")[0] == 200
        with pytest.raises(urllib.error.HTTPError):
            _get(url + f"match?id={first['image_id']}&n=1")  # not re-ranked: no drawing

        a, b, c, d, e = items[:5]
        assert _post(url, {"image_id": a, "action": "top"})[0] == 200
        assert _post(url, {"image_id": b, "action": "candidate", "candidate": 2})[0] == 200
        suggestion = json.loads(_get(url + f"api/suggest?id={c}")[2])["name"]
        assert suggestion and suggestion not in night["known"]
        assert _post(url, {"image_id": c, "action": "new", "identity": suggestion})[0] == 200
        assert _post(url, {"image_id": d, "action": "reject"})[0] == 200
        status, p = _post(url, {"image_id": e, "action": "skip"})
        assert status == 200 and p["reviewed"] == 4 and p["skipped"] == 1 and p["check"]["ok"]
        # refused with a reason, nothing recorded
        status, text = _post(url, {"image_id": e, "action": "new", "identity": night["known"][0]})
        assert status == 400 and "already an individual" in text
        assert _post(url, {"image_id": e, "action": "candidate", "candidate": 9})[0] == 400
        assert _post(url, {"image_id": "nope", "action": "top"})[0] == 400
        assert _state(url)["decisions"][e]["action"] == "skip"
    finally:
        server.stop()

    # second sitting: resumed; two tabs write at once
    server = ReviewServer(out)
    try:
        url = server.url
        s = _state(url)
        assert s["reviewed"] == 4 and s["skipped"] == 1 and set(s["decisions"]) == {a, b, c, d, e}
        rest = items[5:] + [e]
        results: list[int] = []

        def tab(ids):
            for i in ids:
                results.append(_post(url, {"image_id": i, "action": "top"})[0])

        tabs = [threading.Thread(target=tab, args=(rest[k::2],)) for k in (0, 1)]
        for t in tabs:
            t.start()
        for t in tabs:
            t.join(120)
        assert results == [200] * len(rest)
        s = _state(url)
        assert s["reviewed"] == len(items) and s["skipped"] == 0
    finally:
        server.stop()

    res = {i["image_id"]: i for i in s["items"]}
    reviewed = os.path.join(out, "reviewed.csv")
    rows = _rows(reviewed)
    with open(os.path.join(out, "review.partial.json")) as fh:
        assert set(json.load(fh)["decisions"]) == set(items)
    assert rows[a]["accept"] == "yes" and rows[a]["identity"] == res[a]["candidates"][0]["identity"]
    assert rows[b]["identity"] == res[b]["candidates"][1]["identity"]
    assert (rows[c]["decision"], rows[c]["identity"]) == ("new", suggestion)
    assert rows[d]["accept"] == "no" and rows["corrupt"]["accept"] == ""

    check = _cli("review", "--results", out, "--check")
    assert check.returncode == 0, check.stderr
    assert f"{len(items) - 1} accepted (1 as new individuals), 1 rejected" in check.stdout
    merged = _cli(
        "gallery", "merge", "--gallery", gallery, "--results", out, "--reviewed", reviewed
    )
    assert merged.returncode == 0, merged.stderr
    v = open_version(gallery)
    assert v.name == "v0002" and v.info["counts"]["added"] == len(items) - 1
    table = read_table(v, ["image_id", "identity"]).to_pandas().set_index("image_id")
    assert table.loc[c, "identity"] == suggestion and d not in table.index
    assert table.loc[b, "identity"] == res[b]["candidates"][1]["identity"]


def test_check_reports_invalid_rows_like_merge(night, tmp_path):
    from reid_ray.gallery.merge import read_reviewed

    rows = list(_rows(os.path.join(night["out"], "review.csv")).values())
    known = night["known"][0]
    good = next(r for r in rows if r["proposed_decision"] != "error")
    good.update(accept="yes", decision="new", identity=known)  # "new" with a gallery name
    next(r for r in rows if r["image_id"] == "corrupt")["accept"] = "yes"
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ids = {r["image_id"] for r in rows if r["proposed_decision"] != "error"}
    accepted, errors = read_reviewed(str(path), ids, set(night["known"]))
    reasons = {e["image_id"]: e["reason"] for e in errors}
    assert accepted == {} and "already in the gallery" in reasons[good["image_id"]]
    assert "failed image" in reasons["corrupt"]
    result = _cli("review", "--results", night["out"], "--reviewed", str(path), "--check")
    assert result.returncode == 2 and "invalid row" in result.stderr


def test_next_name_follows_the_top_candidates_series():
    from reid_ray.review.state import next_name

    taken = {"sp0-ind000", "sp0-ind004", "sp1-ind002", "zebra", "sp0-ind005"}
    assert next_name(taken, "sp1-ind002") == "sp1-ind003"
    assert next_name(taken, "zebra") == "sp0-ind006"  # the most common series
    assert next_name(taken | {"sp1-ind003"}, "sp1-ind000") == "sp1-ind004"
    assert next_name({"Stripes", "Dot"}) is None


def test_crop_keeps_the_box_and_a_margin_at_the_asked_height():
    import io

    from PIL import Image

    from reid_ray.errors import ImageError
    from reid_ray.review.images import crop_jpeg

    img = Image.new("RGB", (400, 200), (0, 0, 255))
    img.paste((255, 0, 0), (100, 50, 200, 150))  # a red 100x100 box in a blue image
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = Image.open(io.BytesIO(crop_jpeg(buf.getvalue(), [100, 50, 100, 100], height=220)))
    assert out.size == (220, 220)  # the box, 5% margin each side, scaled to 220 px
    r, g, b = out.getpixel((110, 110))
    assert r > 200 and b < 60
    assert out.getpixel((2, 2))[2] > 150  # the margin shows the surroundings
    whole = Image.open(io.BytesIO(crop_jpeg(buf.getvalue(), None, height=100)))
    assert whole.size == (200, 100)
    with pytest.raises(ImageError, match="not a readable image"):
        crop_jpeg(b"not an image", None)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (headless)")
def test_page_renders_in_a_headless_browser(night, tmp_path):
    """The page's script runs in a real browser: the progress line and the query card."""
    from reid_ray.review.server import ReviewServer

    out = str(tmp_path / "n1")
    shutil.copytree(night["out"], out)
    server = ReviewServer(out)
    try:
        dom = subprocess.run(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
             "--virtual-time-budget=15000", "--dump-dom", server.url],
            capture_output=True, text=True, timeout=180,
        ).stdout  # fmt: skip
    finally:
        server.stop()
    assert f"0 of {night['n_night']} reviewed" in dom
    assert 'alt="query"' in dom and "Failed images (1)" in dom
