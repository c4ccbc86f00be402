"""Pre-resized training images in Parquet shards: decoded once, read every epoch.

Training used to read and decode every original image (often a large camera frame) in
every epoch. Here each image is read, decoded, cropped to its bbox and resized to the
size training decodes at (a bit above the input size: augmentation crops from it) once,
and stored, re-encoded small, in Parquet parts::

    ROOT/<fingerprint>/spec.json                 the preprocessing these images went through
    ROOT/<fingerprint>/part-<run>-<id>.parquet   image_id, source, image (encoded), error

``fingerprint`` hashes the preprocessing (size, resize mode, interpolation, encoding): a
rerun, a resumed run or another run with the same model input reuses the shards of every
image already there, even from another manifest. ``source`` hashes what the image was made
from (path and bbox): a row whose file or box changed is made again. An image that would
not decode is stored as an error row (counted again by every run, never decoded again).
Each part is written whole and renamed into place (:func:`reid_ray.parts.write_part`):
a killed writer loses at most the parts in flight, and the next run makes only those.

Pure functions (encode, decode, the per-batch writer and reader) run without Ray; the
Ray wiring is :func:`ensure_shards` (write what is missing, on Ray Data tasks sized from
the cluster) and :func:`shard_dataset` (the epochs' stream).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

#: bump when the stored pixels of the same settings would change
SHARD_VERSION = 1
FORMATS = ("jpeg", "png", "raw")
SPEC_FILE = "spec.json"
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("image", pa.binary()),
        ("error", pa.string()),
    ]
)
INDEX_COLUMNS = ["image_id", "source", "error"]


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How the stored images were made; its hash names their folder."""

    size: int
    resize_mode: str = "resize"
    interpolation: str = "bilinear"
    format: str = "jpeg"
    quality: int = 95  # JPEG only

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"shard format must be one of {FORMATS}, got {self.format!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.format != "jpeg":
            d.pop("quality")
        return {"version": SHARD_VERSION, **d}

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class ShardSet:
    """The shards a run reads: which part holds each usable image, and the bad ones."""

    folder: str
    spec: ShardSpec
    #: image_id -> (name of the part its image is read from, class index, identity)
    take: dict[str, tuple[str, int, str]]
    errors: list[dict]  # {image_id, path, reason} of the images that would not decode
    reused: int = 0  # rows found in shards written before
    written: int = 0  # rows decoded and written now

    @property
    def files(self) -> list[str]:
        return [rio.join(self.folder, name) for name in sorted({t[0] for t in self.take.values()})]


# -- pure parts ------------------------------------------------------------------------------


def row_sources(table: pa.Table) -> list[str]:
    """A short hash per row of what its image is made from (path and bbox)."""
    paths = table["path"].to_pylist()
    boxes = table["bbox"].to_pylist() if "bbox" in table.column_names else [None] * len(paths)
    out = []
    for path, box in zip(paths, boxes, strict=True):
        key = json.dumps([str(path), None if box is None else [float(v) for v in box]])
        out.append(hashlib.sha1(key.encode()).hexdigest()[:16])
    return out


def encode_image(img: np.ndarray, spec: ShardSpec) -> bytes:
    """``[H, W, 3]`` uint8 RGB -> the stored bytes."""
    if spec.format == "raw":
        return np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    import cv2

    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if spec.format == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(spec.quality)])
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB array
        raise ValueError("OpenCV could not encode the image")
    return buf.tobytes()


def decode_stored(data: bytes, spec: ShardSpec) -> np.ndarray:
    """The stored bytes -> ``[size, size, 3]`` uint8 RGB."""
    if spec.format == "raw":
        return np.frombuffer(data, dtype=np.uint8).reshape(spec.size, spec.size, 3)
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != (spec.size, spec.size):
        raise ValueError("a stored training image is unreadable: delete its shard folder")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_shard_batch(batch: dict, *, folder: str, spec: dict, run: str) -> dict:
    """Decode one batch of manifest rows (the same :func:`~reid_ray.data.pipeline.load_batch`
    as every stage), write it as one part in ``folder``; returns its index rows."""
    from reid_ray.data.pipeline import load_batch
    from reid_ray.parts import write_part

    shard = ShardSpec(**spec)
    sources = np.asarray(batch["source"], dtype=object)
    decoded = load_batch(
        {k: v for k, v in batch.items() if k != "source"},
        size=(shard.size, shard.size),
        resize_mode=shard.resize_mode,
        interpolation=shard.interpolation,
    )
    errors = [str(e) for e in decoded["error"]]
    images = [
        b"" if err else encode_image(img, shard)
        for img, err in zip(decoded["image"], errors, strict=True)
    ]
    ids = [str(i) for i in batch["image_id"]]
    name = f"part-{run}-{uuid.uuid4().hex[:12]}.parquet"
    table = pa.table(
        {"image_id": ids, "source": [str(s) for s in sources], "image": images, "error": errors},
        schema=SCHEMA,
    )
    write_part(folder, table, name=name)
    return {
        "image_id": np.asarray(ids, dtype=object),
        "source": sources,
        "error": np.asarray(errors, dtype=object),
        "part": np.asarray([name] * len(ids), dtype=object),
    }


def read_shard_batch(batch: dict, *, take: dict, spec: dict) -> dict:
    """Parts named in ``batch["part"]`` -> the training columns of the rows this run takes
    from each (others belong to other runs, or are older copies of a changed image)."""
    from reid_ray.parts import read_part

    shard = ShardSpec(**spec)
    ids, images, labels, identities = [], [], [], []
    for path in batch["part"]:
        name = os.path.basename(str(path))
        table = read_part(str(path), columns=["image_id", "image"])
        for image_id, data in zip(
            table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True
        ):
            entry = take.get(image_id)
            if entry is None or entry[0] != name:
                continue
            ids.append(image_id)
            images.append(decode_stored(data, shard))
            labels.append(entry[1])
            identities.append(entry[2])
    return {
        "image_id": np.asarray(ids, dtype=object),
        "identity": np.asarray(identities, dtype=object),
        "image": (
            np.stack(images) if ids else np.zeros((0, shard.size, shard.size, 3), dtype=np.uint8)
        ),
        "label": np.asarray(labels, dtype=np.int64),
    }


def resolve_choice(index: pa.Table) -> dict[tuple[str, str], tuple[str, str]]:
    """``(image_id, source) -> (part name, error)``, the first part (by name) of each."""
    chosen: dict[tuple[str, str], tuple[str, str]] = {}
    if index.num_rows == 0:
        return chosen
    order = sorted(
        zip(
            index["part"].to_pylist(),
            index["image_id"].to_pylist(),
            index["source"].to_pylist(),
            index["error"].to_pylist(),
            strict=True,
        )
    )
    for part, image_id, source, error in order:
        chosen.setdefault((image_id, source), (part, error or ""))
    return chosen


# -- storage ---------------------------------------------------------------------------------


def read_index(folder: str, threads: int = 8) -> pa.Table:
    """``image_id, source, error, part`` of every complete part in ``folder`` (the images'
    bytes are not read)."""
    from reid_ray.parts import list_parts, read_part

    files = list_parts(folder)

    def one(path: str) -> pa.Table:
        t = read_part(path, columns=INDEX_COLUMNS)
        return t.append_column("part", pa.array([os.path.basename(path)] * t.num_rows))

    empty = pa.schema([*(SCHEMA.field(c) for c in INDEX_COLUMNS), ("part", pa.string())])
    if not files:
        return empty.empty_table()
    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        tables = list(pool.map(one, files))
    return pa.concat_tables([t.cast(empty) for t in tables])


def _check_spec(folder: str, spec: ShardSpec) -> None:
    path = rio.join(folder, SPEC_FILE)
    if rio.exists(path):
        found = rio.read_json(path)
        if found != spec.to_dict():
            raise ConfigError(f"{folder} holds shards made with {found}, not {spec.to_dict()}")
    else:
        rio.makedirs(folder)
        rio.write_json_atomic(path, spec.to_dict())


# -- Ray wiring ------------------------------------------------------------------------------


def ensure_shards(
    table: pa.Table,
    root: str,
    spec: ShardSpec,
    class_index: dict[str, int],
    *,
    tasks: int,
    cpus_per_task: float,
    rows_per_part: int = 128,
) -> ShardSet:
    """Make sure every row of ``table`` (manifest rows) has its image in the shards under
    ``root``; decode and write only the rows that are missing, on ``tasks`` Ray Data tasks."""
    import ray.data

    from reid_ray.data.pipeline import manifest_dataset
    from reid_ray.parts import new_run_id, remove_temporary

    folder = rio.join(root, spec.fingerprint)
    _check_spec(folder, spec)
    remove_temporary(folder)
    chosen = resolve_choice(read_index(folder))
    sources = row_sources(table)
    ids = [str(i) for i in table["image_id"].to_pylist()]
    missing = [i for i, key in enumerate(zip(ids, sources, strict=True)) if key not in chosen]
    reused = len(ids) - len(missing)
    if missing:
        todo = table.take(pa.array(missing, type=pa.int64()))
        todo = todo.append_column("source", pa.array([sources[i] for i in missing]))
        keep = [c for c in ("image_id", "path", "bbox", "source") if c in todo.column_names]
        logger.info(
            "decoding %d image(s) once into %s (%d reused) on %d task(s) x %g CPU",
            len(missing), folder, reused, tasks, cpus_per_task,
        )  # fmt: skip
        ds = manifest_dataset(todo.select(keep), rows_per_block=rows_per_part).map_batches(
            write_shard_batch,
            fn_kwargs={"folder": folder, "spec": dataclasses.asdict(spec), "run": new_run_id()},
            batch_size=rows_per_part,
            batch_format="numpy",
            num_cpus=cpus_per_task,
            compute=ray.data.TaskPoolStrategy(size=max(1, tasks)),
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for part, image_id, source, error in zip(
                batch["part"].to_pylist(),
                batch["image_id"].to_pylist(),
                batch["source"].to_pylist(),
                batch["error"].to_pylist(),
                strict=True,
            ):
                chosen.setdefault((image_id, source), (part, error or ""))
    take, errors = {}, []
    identities = table["identity"].to_pylist()
    paths = table["path"].to_pylist()
    for image_id, source, identity, path in zip(ids, sources, identities, paths, strict=True):
        part, error = chosen[(image_id, source)]
        if error:
            errors.append({"image_id": image_id, "path": str(path), "reason": error})
        else:
            take[image_id] = (part, class_index.get(str(identity), -1), identity)
    return ShardSet(folder, spec, take, errors, reused=reused, written=len(missing))


def shard_dataset(shards: ShardSet, *, tasks: int, cpus_per_task: float):
    """A Ray Dataset of the usable rows (``image_id``, ``identity``, ``image``, ``label``),
    read from the shards on ``tasks`` tasks: what every epoch streams."""
    import ray.data

    if not shards.take:
        raise ConfigError(f"no usable images in the shards under {shards.folder}")
    files = shards.files
    # one operator (read + decode in the same task, one part per call): nothing waits
    # between a reader and a decoder for the few CPUs the training workers leave
    ds = ray.data.from_items([{"part": f} for f in files], override_num_blocks=len(files))
    return ds.map_batches(
        read_shard_batch,
        fn_kwargs={"take": shards.take, "spec": dataclasses.asdict(shards.spec)},
        batch_format="numpy",
        batch_size=1,
        num_cpus=cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=max(1, tasks)),
    )
