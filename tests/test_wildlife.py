"""wildlife-datasets metadata tables load as manifests (hand-made table, real image files)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid_ray.data import read_manifest
from reid_ray.data.wildlife import wildlife_to_manifest, write_wildlife_manifest
from reid_ray.errors import ConfigError


def _table(root) -> pd.DataFrame:
    """A table as wildlife-datasets builds one: int ids, list bboxes, list species, orientation,
    dates in two spellings, an unknown animal and columns reid-ray does not use."""
    paths = []
    for i in range(4):
        rel = f"images/{i}.png"
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / rel)
        paths.append(rel)
    return pd.DataFrame(
        {
            "image_id": [10, 11, 12, 13],
            "identity": ["a", "a", "b", "unknown"],
            "path": paths,
            "bbox": [[1, 2, 10, 8], [0.5, 0, 20, 10], None, [1, 1, 5, 5]],
            "species": [["seal"], "seal", ["seal", "gull"], None],
            "orientation": ["left", "right", None, "left"],
            "date": ["2020-01-02", "2020/01/03 10:20:30", None, "not a date"],
            "keypoints": [[1, 2], None, None, None],
        }
    )


def test_conversion_maps_every_column(tmp_path):
    conv = wildlife_to_manifest(_table(tmp_path), root=str(tmp_path), species="seal")
    df = conv.frame
    assert list(df["image_id"]) == ["10", "11", "12", "13"]
    assert df["path"].iloc[0] == str(tmp_path / "images/0.png")
    assert list(df["viewpoint"]) == ["left", "right", "", "left"]
    assert list(df["bbox"]) == ["1,2,10,8", "0.5,0,20,10", "", "1,1,5,5"]
    assert list(df["species"]) == ["seal", "seal", "seal+gull", "seal"]
    assert list(df["date"]) == ["2020-01-02", "2020-01-03T10:20:30", "", "not a date"]
    assert conv.dropped_columns == ["keypoints"]
    assert conv.counts["identities"] == 2 and conv.counts["unknown_identity_rows"] == 1


def test_written_manifest_loads_with_unknown_identity(tmp_path):
    out = tmp_path / "manifest.csv"
    write_wildlife_manifest(_table(tmp_path), str(out), root=str(tmp_path))
    manifest = read_manifest(str(out))
    assert manifest.errors.num_rows == 0
    table = manifest.to_pandas().set_index("image_id")
    assert pd.isna(table.loc["13", "identity"])  # "unknown" means unknown here too
    assert list(table.loc["10", "bbox"]) == [1, 2, 10, 8]


def test_dataset_object_and_table_file(tmp_path):
    table = _table(tmp_path)

    class DogFaces:  # what DatasetClass(root) exposes: .df and .root
        df = table
        root = str(tmp_path)

    from_object = wildlife_to_manifest(DogFaces()).frame
    table.to_csv(tmp_path / "metadata.csv", index=False)
    from_file = wildlife_to_manifest(str(tmp_path / "metadata.csv")).frame
    assert list(from_object["path"]) == list(from_file["path"])
    assert from_file["path"].iloc[1] == str(tmp_path / "images/1.png")


def test_missing_columns_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="image_id and path"):
        wildlife_to_manifest(pd.DataFrame({"image_id": [1], "identity": ["a"]}))
    with pytest.raises(ConfigError, match="not found"):
        wildlife_to_manifest(str(tmp_path / "nope.csv"))
