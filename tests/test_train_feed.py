"""The training feed: images decoded, cropped and resized once into Parquet shards, then
streamed every epoch. Shards are written once and reused, equal decoding directly, count a
bad image instead of crashing, and a killed writer's lost parts are made again (and only
those)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reid_ray.data import read_manifest
from reid_ray.data.pipeline import load_batch
from reid_ray.errors import ConfigError
from reid_ray.parts import list_parts
from reid_ray.runtime import ClusterView, plan_data_tasks
from reid_ray.train.shards import (
    ShardSpec,
    decode_stored,
    encode_image,
    ensure_shards,
    row_sources,
    shard_dataset,
)

SIZE = 40


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """2 species x 6 individuals x 4 images at 64 px, with boxes; one file corrupt."""
    from reid_ray.synth import generate_zoo

    out = tmp_path_factory.mktemp("feedzoo")
    summary = generate_zoo(str(out), species=2, individuals=6, images_per=4, size=64, seed=5)
    table = read_manifest(summary.metadata_path).table
    corrupt = str(table["image_id"][3])
    with open(str(table["path"][3]), "wb") as f:
        f.write(b"not an image at all")
    return {"table": table, "corrupt": corrupt, "manifest": summary.metadata_path}


def _classes(table: pa.Table) -> dict[str, int]:
    return {c: i for i, c in enumerate(sorted(set(table["identity"].to_pylist())))}


def _rows(ds) -> dict[str, dict]:
    return {
        str(r["image_id"]): r
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None)
        for r in (
            {k: batch[k][i] for k in batch} for i in range(len(batch["image_id"]))
        )  # fmt: skip
    }


def test_stored_images_round_trip_and_the_fingerprint_follows_the_settings():
    img = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    for fmt in ("raw", "png"):
        spec = ShardSpec(size=SIZE, format=fmt)
        assert np.array_equal(decode_stored(encode_image(img, spec), spec), img)
    smooth = np.repeat(np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :, None], SIZE, 0)
    smooth = np.repeat(smooth, 3, axis=2)
    jpeg = ShardSpec(size=SIZE, format="jpeg", quality=95)
    back = decode_stored(encode_image(smooth, jpeg), jpeg)
    assert back.shape == smooth.shape and np.abs(back.astype(int) - smooth).mean() < 3
    base = ShardSpec(size=SIZE).fingerprint
    assert ShardSpec(size=SIZE).fingerprint == base  # stable
    assert len({base, ShardSpec(size=SIZE + 1).fingerprint,
                ShardSpec(size=SIZE, format="raw").fingerprint,
                ShardSpec(size=SIZE, resize_mode="letterbox").fingerprint}) == 4  # fmt: skip
    with pytest.raises(ConfigError, match="format"):
        ShardSpec(size=SIZE, format="webp")


def test_row_sources_change_with_the_file_or_the_box():
    t = pa.table({"path": ["a.jpg", "a.jpg", "b.jpg"], "bbox": [[0, 0, 5, 5], [0, 0, 5, 6], None]})
    a, b, c = row_sources(t)
    assert len({a, b, c}) == 3 and row_sources(t)[0] == a


def test_data_tasks_are_sized_from_the_cluster():
    # nothing else running: every CPU decodes
    assert plan_data_tasks(ClusterView(cpus=64, gpus=8)) == (64, 1.0)
    # beside 8 GPU workers holding a CPU each
    assert plan_data_tasks(ClusterView(cpus=64, gpus=8), held_cpus=8) == (56, 1.0)
    # a 2-CPU machine with its workers holding 1.5: the half-CPU reserve
    assert plan_data_tasks(ClusterView(cpus=2, gpus=0), held_cpus=1.5) == (1, 0.5)


def test_shards_written_once_equal_direct_decoding_and_count_the_bad_image(
    ray_cluster, zoo, tmp_path
):
    table, classes = zoo["table"], _classes(zoo["table"])
    spec = ShardSpec(size=SIZE, format="raw")  # raw: exact, so equality is checkable
    root = str(tmp_path / "shards")
    first = ensure_shards(table, root, spec, classes, tasks=2, cpus_per_task=0.5, rows_per_part=8)
    n = table.num_rows
    assert first.written == n and first.reused == 0
    assert [e["image_id"] for e in first.errors] == [zoo["corrupt"]]
    assert first.errors[0]["reason"]  # the reason is kept, the run goes on
    assert len(first.take) == n - 1 and zoo["corrupt"] not in first.take

    rows = _rows(shard_dataset(first, tasks=1, cpus_per_task=0.5))
    assert set(rows) == set(first.take)
    direct = load_batch(
        {k: np.asarray(table[k].to_pylist(), dtype=object) for k in ("image_id", "path", "bbox")},
        size=(SIZE, SIZE),
    )
    identity = dict(zip(table["image_id"].to_pylist(), table["identity"].to_pylist(), strict=True))
    for image_id, image, error in zip(
        direct["image_id"], direct["image"], direct["error"], strict=True
    ):
        if error:
            assert image_id == zoo["corrupt"]
            continue
        row = rows[image_id]
        assert np.array_equal(row["image"], image), image_id
        assert row["label"] == classes[identity[image_id]] and row["identity"] == identity[image_id]

    # a second run (another manifest order, same input size) decodes nothing and
    # counts the bad image again from the shards' index
    parts = list_parts(first.folder)
    again = ensure_shards(
        table.take(pa.array(np.arange(n)[::-1])), root, spec, classes, tasks=2, cpus_per_task=0.5
    )
    assert again.written == 0 and again.reused == n
    assert [e["image_id"] for e in again.errors] == [zoo["corrupt"]]
    assert list_parts(first.folder) == parts and again.take == first.take


def test_a_killed_writer_is_resumed_and_a_changed_box_remade(ray_cluster, zoo, tmp_path):
    table, classes = zoo["table"], _classes(zoo["table"])
    spec = ShardSpec(size=SIZE, format="jpeg")
    root = str(tmp_path / "shards")
    first = ensure_shards(table, root, spec, classes, tasks=2, cpus_per_task=0.5, rows_per_part=8)
    parts = list_parts(first.folder)
    assert len(parts) == -(-table.num_rows // 8)
    # a killed writer: one part never renamed into place, a temporary file left behind
    lost = pq.read_table(parts[0], columns=["image_id"]).num_rows
    os.rename(parts[0], parts[0] + ".tmp-deadbeef")
    resumed = ensure_shards(table, root, spec, classes, tasks=2, cpus_per_task=0.5)
    assert resumed.written == lost and resumed.reused == table.num_rows - lost
    assert not any(".tmp-" in f for f in os.listdir(first.folder))
    assert set(resumed.take) == set(first.take)

    # one row's box changes: that image alone is made again
    boxes = table["bbox"].to_pylist()
    boxes[0] = [1.0, 1.0, 30.0, 30.0]
    moved = table.set_column(table.schema.get_field_index("bbox"), "bbox", pa.array(boxes))
    remade = ensure_shards(moved, root, spec, classes, tasks=1, cpus_per_task=0.5)
    assert remade.written == 1 and remade.reused == table.num_rows - 1
    # the old copy stays in its part but is never read for this run
    rows = _rows(shard_dataset(remade, tasks=1, cpus_per_task=0.5))
    assert len(rows) == len(remade.take) == table.num_rows - 1

    # another preprocessing: other shards, a folder of its own
    other = ensure_shards(table, root, ShardSpec(size=SIZE + 8), classes, tasks=1, cpus_per_task=1)
    assert other.folder != first.folder and other.written == table.num_rows


@pytest.mark.slow
def test_training_reuses_the_shards_of_an_earlier_run(ray_cluster, zoo, tmp_path):
    from reid_ray.train import TrainConfig, train

    cache = str(tmp_path / "cache")
    cfg = TrainConfig(
        model="timm-random:resnet18", image_size=32, embedding_dim=16, batch_size=8, epochs=1,
        workers=1, calibration_fraction=0.0, shard_cache=cache, decoded_cache_mb=0,
    )  # fmt: skip
    first = train(zoo["manifest"], str(tmp_path / "a"), config=cfg)
    assert first["feed"]["feed"] == "shards" and first["feed"]["reused"] == 0
    n = first["counts"]["train_images"]
    assert first["feed"]["written"] == n + 1 and first["counts"]["errors"] == 1
    assert first["history"][0]["images"] == (n // 8) * 8
    second = train(zoo["manifest"], str(tmp_path / "b"), config=cfg)
    assert second["feed"]["written"] == 0 and second["feed"]["reused"] == n + 1
    assert second["counts"]["errors"] == 1 and second["counts"]["train_images"] == n
