"""Manifests and images: every bad-input case of the README contract, local and on a real S3 server."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid_ray.data import decode_image, load_image, parse_bbox, read_manifest, resize_image
from reid_ray.errors import ImageError, ManifestError


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def gradient() -> np.ndarray:
    """A 40x60 image whose pixels say where they came from (left red, right green)."""
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :30, 0] = 220
    arr[:, 30:, 1] = 220
    arr[:20, :, 2] = 100
    return arr


# --- image decoding -------------------------------------------------------------------


def test_png_named_jpg_decodes_by_content(tmp_path, gradient):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(_png_bytes(Image.fromarray(gradient)))
    img = load_image(str(path))
    assert img.shape == (40, 60, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, gradient)


def test_truncated_jpeg_is_an_error(tmp_path, gradient):
    data = _jpeg_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt|truncated"):
        load_image(str(path))


def test_zero_byte_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(str(path))


def test_text_named_jpg_is_an_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image(str(path))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ImageError, match="missing file"):
        load_image(str(tmp_path / "nope.jpg"))


def test_greyscale_cmyk_rgba_16bit_all_load_as_rgb(gradient):
    grey = Image.fromarray(gradient[..., 0])
    cmyk = Image.fromarray(gradient).convert("CMYK")
    rgba = Image.fromarray(np.dstack([gradient, np.full(gradient.shape[:2], 255, np.uint8)]))
    sixteen = Image.fromarray(gradient[..., 0].astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    for img in (grey, cmyk, rgba, sixteen):
        fmt = "JPEG" if img.mode == "CMYK" else "PNG"
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out = decode_image(buf.getvalue())
        assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    # 16-bit is scaled, not clipped: 220*257 -> 220
    out16 = decode_image(_png_bytes(sixteen))
    assert abs(int(out16[0, 0, 0]) - 220) <= 1 and out16[0, 59, 0] == 0


def test_exif_orientation_is_applied(gradient):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _jpeg_bytes(gradient, exif=exif.tobytes())
    img = decode_image(data)
    assert img.shape == (60, 40, 3)  # rotated: width and height swapped
    # after a 90-degree clockwise turn the red (left) half is on top
    assert img[5, 20, 0] > 150 and img[55, 20, 1] > 150


def _big_scene(h: int = 1200, w: int = 1600) -> np.ndarray:
    """A large picture with structure at several scales (seeded)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack(
        [(xx * 255 // w), (yy * 255 // h), ((xx // 100 + yy // 100) % 2) * 200], axis=-1
    ).astype(np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, h - 200), rng.integers(0, w - 200)
        arr[y : y + 150, x : x + 150] = rng.integers(0, 255, 3)
    return arr


def test_large_jpeg_decodes_at_reduced_scale_to_the_same_picture():
    data = _jpeg_bytes(_big_scene())
    size = (64, 64)
    full = decode_image(data)
    fast = decode_image(data, target=size)
    assert full.shape == (1200, 1600, 3)
    assert 64 <= fast.shape[0] <= 150 and 64 <= fast.shape[1] <= 200  # 1/8 scale
    diff = np.abs(
        resize_image(full, size).astype(int) - resize_image(fast, size).astype(int)
    ).mean()
    assert diff < 4.0, diff
    # a bbox in full-resolution pixels: the crop is the same region, still >= the target
    bbox = [400, 300, 800, 600]
    full_crop, fast_crop = decode_image(data, bbox), decode_image(data, bbox, target=size)
    assert full_crop.shape == (600, 800, 3) and 64 <= fast_crop.shape[0] < 600
    diff = np.abs(
        resize_image(full_crop, size).astype(int) - resize_image(fast_crop, size).astype(int)
    ).mean()
    assert diff < 4.0, diff
    # a target close to the image size, and PNGs, decode at full size
    assert decode_image(data, target=(800, 900)).shape == (1200, 1600, 3)
    png = _png_bytes(Image.fromarray(_big_scene(300, 400)))
    assert decode_image(png, target=(16, 16)).shape == (300, 400, 3)


def test_reduced_scale_respects_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6
    scene = _big_scene(800, 1600)  # wide; shown tall
    data = _jpeg_bytes(scene, exif=exif.tobytes())
    full, fast = decode_image(data), decode_image(data, target=(128, 64))
    assert full.shape == (1600, 800, 3) and fast.shape[0] >= 128 and fast.shape[1] >= 64
    assert fast.shape[0] < 1600
    diff = np.abs(
        resize_image(full, (128, 64)).astype(int) - resize_image(fast, (128, 64)).astype(int)
    ).mean()
    assert diff < 4.0, diff


def test_load_batch_reads_concurrently_with_the_same_result(tmp_path, gradient):
    from reid_ray.data.pipeline import load_batch

    paths = []
    for k in range(6):
        path = tmp_path / f"i{k}.jpg"
        path.write_bytes(_jpeg_bytes(np.roll(gradient, k * 5, axis=1)))
        paths.append(str(path))
    paths.append(str(tmp_path / "absent.jpg"))
    batch = {
        "image_id": np.array([f"i{k}" for k in range(7)], dtype=object),
        "path": np.array(paths, dtype=object),
    }
    one = load_batch(batch, size=(16, 16), read_threads=1)
    many = load_batch(batch, size=(16, 16), read_threads=4)
    np.testing.assert_array_equal(one["image"], many["image"])
    assert list(one["error"]) == list(many["error"])
    assert many["error"][-1].startswith("missing file") and not any(many["error"][:-1])


def test_decompression_bomb_is_refused():
    big = Image.new("L", (3000, 3000))
    with pytest.raises(ImageError, match="too large|bomb"):
        decode_image(_png_bytes(big), max_pixels=1_000_000)


def test_bbox_crop_clip_and_outside(gradient):
    crop = decode_image(_png_bytes(Image.fromarray(gradient)), bbox=[30, 0, 30, 40])
    assert crop.shape == (40, 30, 3) and crop[..., 1].min() == 220  # the green half only
    partly = decode_image(_png_bytes(Image.fromarray(gradient)), bbox=[50, 30, 50, 50])
    assert partly.shape == (10, 10, 3)  # clipped to the image
    with pytest.raises(ImageError, match="outside"):
        decode_image(_png_bytes(Image.fromarray(gradient)), bbox=[100, 100, 10, 10])


def test_resize_and_letterbox_keep_the_whole_crop(gradient):
    assert resize_image(gradient, (32, 32)).shape == (32, 32, 3)
    boxed = resize_image(gradient, (60, 60), mode="letterbox")
    assert boxed.shape == (60, 60, 3)
    assert boxed[:5].max() == 0 and boxed[-5:].max() == 0  # padding above and below
    assert boxed[30, 5, 0] > 150 and boxed[30, 55, 1] > 150  # both halves kept: no centre crop


@pytest.mark.parametrize(
    "text, expected",
    [("1,2,3,4", [1, 2, 3, 4]), ("[1, 2, 3.5, 4]", [1, 2, 3.5, 4]), ("", None), (None, None)],
)
def test_parse_bbox_forms(text, expected):
    assert parse_bbox(text) == expected


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "[1,2,-3,4]", "__import__('os')"])
def test_parse_bbox_rejects(text):
    with pytest.raises(ValueError, match="bad bbox"):
        parse_bbox(text)


# --- manifests ------------------------------------------------------------------------


def _write_images(folder, n=4, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i}.jpg"
        (folder / name).write_bytes(_jpeg_bytes(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)))
        names.append(name)
    return names


def test_manifest_relative_paths_and_columns(tmp_path):
    _write_images(tmp_path / "images")
    pd.DataFrame(
        {
            "image_id": [1, 2, 3],
            "path": ["images/img0.jpg", str(tmp_path / "images/img1.jpg"), "images/img2.jpg"],
            "identity": ["a", "unknown", ""],
            "bbox": ["[0, 0, 10, 10]", "", "1,1,5,5"],
            "species": ["zebra", "zebra", "zebra"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    m = read_manifest(str(tmp_path / "m.csv"))
    t = m.table.to_pydict()
    assert t["image_id"] == ["1", "2", "3"]
    assert t["path"][0] == str(tmp_path / "images/img0.jpg")
    assert t["identity"] == ["a", None, None]  # "unknown" and empty both mean unknown
    assert t["bbox"][0] == [0, 0, 10, 10] and t["bbox"][1] is None
    assert m.errors.num_rows == 0


def test_manifest_parquet(tmp_path):
    _write_images(tmp_path)
    pd.DataFrame(
        {"image_id": ["x", "y"], "path": ["img0.jpg", "img1.jpg"], "identity": ["a", "b"]}
    ).to_parquet(tmp_path / "m.parquet")
    m = read_manifest(str(tmp_path / "m.parquet"))
    assert m.table["image_id"].to_pylist() == ["x", "y"]


def test_duplicate_ids_bad_bbox_unknown_columns_are_reported_not_dropped(tmp_path):
    _write_images(tmp_path)
    pd.DataFrame(
        {
            "image_id": ["a", "b", "a", "c", ""],
            "path": ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg", "img0.jpg"],
            "bbox": ["", "", "", "1,2,3", ""],
            "camera_model": ["x"] * 5,
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    m = read_manifest(str(tmp_path / "m.csv"))
    assert m.table["image_id"].to_pylist() == ["a", "b"]
    reasons = dict(zip(m.errors["path"].to_pylist(), m.errors["reason"].to_pylist(), strict=True))
    assert "duplicate image_id" in reasons[str(tmp_path / "img2.jpg")]
    assert "bad bbox" in reasons[str(tmp_path / "img3.jpg")]
    assert any("empty image_id" in r for r in reasons.values())
    # every input row is either usable or has a reason
    assert m.table.num_rows + m.errors.num_rows == 5
    assert any("camera_model" in w for w in m.warnings)


def test_empty_manifest_fails_fast(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ManifestError, match="empty"):
        read_manifest(str(tmp_path / "empty.csv"))
    (tmp_path / "header_only.csv").write_text("image_id,path\n")
    with pytest.raises(ManifestError, match="empty"):
        read_manifest(str(tmp_path / "header_only.csv"))


def test_missing_required_column_and_missing_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("image_id,identity\n1,a\n")
    with pytest.raises(ManifestError, match="required column.*path"):
        read_manifest(str(tmp_path / "m.csv"))
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "absent.csv"))


def test_split_file_sets_split_column(tmp_path):
    _write_images(tmp_path)
    pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "path": ["img0.jpg", "img1.jpg", "img2.jpg"],
            "identity": ["x", "x", "y"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "split.csv").write_text("image_id,split\na,gallery\nb,query\n")
    m = read_manifest(str(tmp_path / "m.csv"), split_file=str(tmp_path / "split.csv"))
    assert m.table["split"].to_pylist() == ["gallery", "query", None]
    assert m.select_splits("query").table["image_id"].to_pylist() == ["b"]


# --- a batch through Ray: bad rows counted, good rows loaded ------------------------------


def _bad_input_folder(tmp_path) -> str:
    good = _write_images(tmp_path, n=3)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    full = _jpeg_bytes(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (tmp_path / "png.jpg").write_bytes(_png_bytes(Image.new("RGB", (20, 20), (0, 0, 255))))
    rows = [dict(image_id=f"g{i}", path=n, bbox="") for i, n in enumerate(good)]
    rows += [
        dict(image_id="empty", path="empty.jpg", bbox=""),
        dict(image_id="text", path="text.jpg", bbox=""),
        dict(image_id="trunc", path="truncated.jpg", bbox=""),
        dict(image_id="png", path="png.jpg", bbox=""),
        dict(image_id="missing", path="missing.jpg", bbox=""),
        dict(image_id="outside", path=good[0], bbox="500,500,10,10"),
        dict(image_id="g0", path=good[1], bbox=""),  # duplicate id
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return str(tmp_path / "m.csv")


def test_image_pipeline_counts_every_bad_row(ray_cluster, tmp_path):
    from reid_ray.data.pipeline import image_dataset

    m = read_manifest(_bad_input_folder(tmp_path))
    assert m.errors.num_rows == 1  # the duplicate id, caught at the door
    ds = image_dataset(m, size=(24, 24), batch_size=3, rows_per_block=2)
    rows = {}
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for image_id, err, img in zip(
            batch["image_id"], batch["error"], batch["image"], strict=True
        ):
            rows[str(image_id)] = (str(err), img)
    assert set(rows) == {"g0", "g1", "g2", "empty", "text", "trunc", "png", "missing", "outside"}
    ok = {k for k, (err, _) in rows.items() if err == ""}
    assert ok == {"g0", "g1", "g2", "png"}
    assert "empty file" in rows["empty"][0]
    assert "not an image" in rows["text"][0]
    assert "corrupt" in rows["trunc"][0] or "truncated" in rows["trunc"][0]
    assert "missing file" in rows["missing"][0]
    assert "outside" in rows["outside"][0]
    assert rows["png"][1][..., 2].min() == 255 and rows["g0"][1].shape == (24, 24, 3)


# --- S3 (moto server on 127.0.0.1) --------------------------------------------------------


def test_manifest_and_images_from_s3(ray_cluster, s3_bucket, tmp_path):
    from reid_ray import io as rio
    from reid_ray.data.pipeline import image_dataset

    names = _write_images(tmp_path, n=3)
    fs, _ = rio.filesystem(s3_bucket)
    for n in names:
        fs.put(str(tmp_path / n), f"{s3_bucket[5:]}/zoo/images/{n}")
    csv = "image_id,path,identity\n" + "".join(
        f"i{k},images/{n},ind{k % 2}\n" for k, n in enumerate(names)
    )
    csv += "gone,images/missing.jpg,ind0\n"
    rio.write_bytes_atomic(f"{s3_bucket}/zoo/metadata.csv", csv.encode())

    m = read_manifest(f"{s3_bucket}/zoo/metadata.csv")
    assert m.table["path"][0].as_py() == f"{s3_bucket}/zoo/images/img0.jpg"
    img = load_image(m.table["path"][1].as_py())
    np.testing.assert_array_equal(img, load_image(str(tmp_path / names[1])))
    errors = {}
    for batch in image_dataset(m, size=(16, 16), batch_size=2).iter_batches(batch_format="numpy"):
        errors.update(zip(batch["image_id"], batch["error"], strict=True))
    assert errors["i0"] == "" and errors["i2"] == ""
    assert errors["gone"].startswith("missing file")
