"""``reid-ray manifest`` and ``reid-ray split``: a user's own folder of images in.

Real image files (JPEG, a PNG without an image extension, greyscale), files that only
look like images, a truncated header; a local folder through the real CLI and an
``s3://`` prefix on moto.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid_ray.data import read_manifest, read_split
from reid_ray.data.folders import errors_path_for, scan_folder, write_folder_manifest


def _image_bytes(seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
    img = Image.fromarray(array).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root, individuals: int = 4, per: int = 3) -> dict[str, bytes]:
    """A folder per individual plus the files a real collection holds; returns
    {relative path: bytes} of everything written."""
    files: dict[str, bytes] = {}
    for i in range(individuals):
        for j in range(per):
            files[f"dog{i}/img{j}.jpg"] = _image_bytes(10 * i + j)
    files["dog0/scan.dat"] = _image_bytes(99, "PNG", "L")  # an image, whatever its name
    files["dog1/notes.jpg"] = b"not a picture at all\n"  # looks like one, is not
    files["dog2/cut.jpg"] = _image_bytes(98)[:40]  # a JPEG cut inside its header
    files["loose.png"] = _image_bytes(97, "PNG")  # no individual's folder
    files[".DS_Store"] = b"\x00\x00\x00\x01Bud1"
    for rel, data in files.items():
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


def test_scan_finds_images_by_content_and_records_the_rest(tmp_path):
    make_folder(tmp_path / "photos")
    scan = scan_folder(str(tmp_path / "photos"), by_identity=True, threads=2)
    ids = set(scan.frame["image_id"])
    assert "dog0/scan.dat" in ids and "loose.png" in ids and len(ids) == 14
    assert scan.frame.set_index("image_id").loc["loose.png", "identity"] == ""
    assert scan.frame.set_index("image_id").loc["dog3/img2.jpg", "identity"] == "dog3"
    reasons = dict(
        zip(scan.errors["path"].map(os.path.basename), scan.errors["reason"], strict=True)
    )
    assert reasons == {
        ".DS_Store": "hidden file (skipped)",
        "notes.jpg": "not an image (unrecognised content)",
        "cut.jpg": "corrupt JPEG file (its header does not read)",
    }
    assert scan.n_files == 17 and scan.formats == {"JPEG": 12, "PNG": 2}
    unlabelled = scan_folder(str(tmp_path / "photos"), threads=1)
    assert list(unlabelled.frame.columns) == ["image_id", "path"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", COLUMNS="80")
    return subprocess.run(
        [sys.executable, "-m", "reid_ray.cli", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_manifest_then_split_through_the_cli(tmp_path):
    files = make_folder(tmp_path / "photos", individuals=10, per=4)
    manifest = tmp_path / "photos" / "manifest.csv"
    result = run_cli("manifest", "--images", str(tmp_path / "photos"), "--by-identity",
                     "--out", str(manifest))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "not images  3" in result.stdout and "identities  10" in result.stdout
    loaded = read_manifest(str(manifest))  # paths relative to the manifest's folder
    assert len(loaded) == 42 and loaded.errors.num_rows == 0
    frame = loaded.to_pandas().set_index("image_id")
    with open(frame.loc["dog4/img1.jpg", "path"], "rb") as f:
        assert f.read() == files["dog4/img1.jpg"]
    assert pd.read_csv(manifest)["path"].iloc[0].startswith("dog")  # relocatable folder
    assert len(pd.read_csv(errors_path_for(str(manifest)))) == 3

    # a rerun finds the same images: its own outputs are not scanned as bad files
    again = run_cli("manifest", "--images", str(tmp_path / "photos"), "--by-identity",
                    "--out", str(manifest))  # fmt: skip
    assert again.returncode == 0 and "not images  3" in again.stdout

    split = tmp_path / "split.csv"
    result = run_cli("split", "--manifest", str(manifest), "--out", str(split), "--seed", "3")
    assert result.returncode == 0, result.stderr
    table = read_split(str(split))
    assert set(table["split"]) == {"train", "val", "query", "gallery", "query_unknown"}
    assert "loose.png" not in set(table["image_id"])  # no identity: unused, and said so
    assert "unused" in result.stdout and "1 images (no identity)" in result.stdout
    identity = frame["identity"].to_dict()
    per_split = table.assign(identity=table["image_id"].map(identity))
    train, test = (
        set(per_split.loc[per_split["split"] == s, "identity"]) for s in ("train", "query")
    )
    assert train and test and not (train & test)  # disjoint: no individual in both


def test_split_of_a_manifest_without_identities_is_one_clear_error(tmp_path):
    make_folder(tmp_path / "night", individuals=1, per=2)
    scan = scan_folder(str(tmp_path / "night"))
    write_folder_manifest(scan, str(tmp_path / "night.csv"))
    result = run_cli(
        "split", "--manifest", str(tmp_path / "night.csv"), "--out", str(tmp_path / "s.csv")
    )
    assert result.returncode == 2 and "has no identities" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_manifest_of_an_s3_prefix(s3_bucket, tmp_path):
    import s3fs

    files = make_folder(tmp_path / "up", individuals=3, per=2)
    fs = s3fs.S3FileSystem(
        key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
    )  # fmt: skip
    bucket = s3_bucket[len("s3://") :]
    for rel, data in files.items():
        fs.pipe(f"{bucket}/dogs/{rel}", data)
    scan = scan_folder(f"{s3_bucket}/dogs", by_identity=True, threads=4)
    assert len(scan.frame) == 8 and len(scan.errors) == 3
    assert scan.frame["path"].str.startswith(f"{s3_bucket}/dogs/").all()
    out = f"{s3_bucket}/manifests/dogs.csv"
    write_folder_manifest(scan, out)
    loaded = read_manifest(out)
    assert len(loaded) == 8
    assert set(loaded.to_pandas()["identity"].dropna()) == {"dog0", "dog1", "dog2"}
    assert fs.cat_file(f"{bucket}/dogs/dog2/img1.jpg") == files["dog2/img1.jpg"]


def test_manifest_refuses_a_file_and_a_missing_folder(tmp_path):
    from reid_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        scan_folder(str(tmp_path / "absent"))
    (tmp_path / "f.jpg").write_bytes(_image_bytes(1))
    with pytest.raises(ConfigError, match="takes a folder"):
        scan_folder(str(tmp_path / "f.jpg"))
    make_folder(tmp_path / "p", individuals=1, per=1)
    with pytest.raises(ConfigError, match=r"\.csv"):
        write_folder_manifest(scan_folder(str(tmp_path / "p")), str(tmp_path / "m.parquet"))
