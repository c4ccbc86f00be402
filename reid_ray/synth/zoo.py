"""The synthetic "toy zoo": animals whose identity is carried only by their coat pattern.

Why a toy zoo: every stage of reid-ray (embedding, training, retrieval, re-ranking, active
learning, the demo) needs labelled images that anyone can make in seconds, without
downloading a dataset. The zoo is built so that the *only* cue to identity is the pattern:

* a **species** fixes the body silhouette, the coat and pattern colours and the pattern's
  statistics (kind, density, mark size); all its individuals share them;
* an **individual** owns two coat textures, one per flank (left and right flanks of a real
  animal differ), drawn once from ``(seed, species, index)``: spots, stripes or rosettes at
  positions only that individual has;
* every **image** warps one flank texture onto the species body with a random homography
  (rotation, scale, perspective), composites it on a procedural cluttered background and
  adds a lighting gradient, dappled light, an occluder, blur, noise and JPEG compression.

So colour, size and background say nothing about identity; a network has to read the
pattern (local-feature matching does that well, a random-init network does not).

Determinism: every random number comes from a ``numpy.random.Generator`` seeded with an
explicit key (``(seed, species, index, ...)``), so the same arguments give byte-identical
files (with the same numpy and OpenCV), and adding images or individuals leaves the
existing ones unchanged. Rendering uses
vectorised numpy and OpenCV: a few milliseconds per 256 px image on one core. Zoos larger
than :data:`RAY_MIN_IMAGES` images are rendered by Ray tasks; smaller ones in-process
(starting Ray costs seconds).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from reid_ray import io
from reid_ray.errors import ConfigError
from reid_ray.synth.render import (  # noqa: F401 - re-exported: the zoo's public pieces
    _FIRST_DATE,
    _TAG_DATE,
    JPEG_QUALITY,
    Species,
    _scene,
    coat_texture,
    identity_name,
    make_individual,
    render_image,
    species_of,
)
from reid_ray.synth.shapes import _Body, _body  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

#: zoos with more images than this are rendered by Ray tasks (one per chunk of individuals)
RAY_MIN_IMAGES = 5000
#: images rendered by one Ray task
RAY_CHUNK_IMAGES = 400
METADATA_COLUMNS = ("image_id", "path", "identity", "species", "viewpoint", "bbox", "date")


# -- the zoo ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooSummary:
    """What :func:`generate_zoo` wrote: paths, counts and the wall time it took."""

    out: str
    metadata_path: str
    split_path: str
    n_images: int
    n_individuals: int
    n_species: int
    seconds: float


def individuals_per_species(individuals: int, species: int) -> list[int]:
    """Spread ``individuals`` over ``species`` as evenly as possible (the first ones get
    one more when it does not divide)."""
    return [individuals // species + (s < individuals % species) for s in range(species)]


def _check_args(species, individuals, images_per, size, seed, split_kind) -> None:
    from reid_ray.data.splits import SPLIT_KINDS

    for name, value, low in (
        ("species", species, 1),
        ("individuals", individuals, 1),
        ("images_per", images_per, 1),
        ("size", size, 32),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if size > 4096:
        raise ConfigError(f"size must be <= 4096 px, got {size}")
    if individuals < species:
        raise ConfigError(
            f"individuals ({individuals}) is the total over all species: it must be at least "
            f"the number of species ({species})"
        )
    if split_kind not in SPLIT_KINDS:
        raise ConfigError(
            f"unknown split kind {split_kind!r}; expected one of {', '.join(SPLIT_KINDS)}"
        )


def _image_id(identity: str, j: int) -> str:
    return f"{identity}-img{j:03d}"


def _render_individuals(
    keys: Iterable[tuple[int, int]],
    images_per: int,
    size: int,
    seed: int,
    sink: Callable[[str, bytes], None],
    tick: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """Render every image of the individuals ``keys`` ((species, index) pairs), hand each
    JPEG to ``sink(relative_path, data)`` and return their metadata rows in order.

    Pure apart from ``sink``: the in-process path and the Ray tasks both call it, so they
    produce the same bytes.
    """
    scene = _scene(seed, size)
    bodies: dict[int, _Body] = {}
    rows: list[dict] = []
    encode = [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY]
    for s, k in keys:
        sp = species_of(s)
        if s not in bodies:
            bodies[s] = _body(sp.shape, size)
        ind = make_individual(seed, s, k, bodies[s], size)
        for j in range(images_per):
            img, viewpoint, (x, y, w, h), date = render_image(ind, j, seed, scene)
            ok, buf = cv2.imencode(".jpg", img, encode)
            if not ok:  # OpenCV failed to encode an in-memory array: a bug, not user input
                raise RuntimeError(f"JPEG encoding failed for {ind.identity} image {j}")
            image_id = _image_id(ind.identity, j)
            rel = f"images/{ind.identity}/{image_id}.jpg"
            sink(rel, buf.tobytes())
            rows.append(
                {
                    "image_id": image_id,
                    "path": rel,
                    "identity": ind.identity,
                    "species": sp.name,
                    "viewpoint": viewpoint,
                    "bbox": f"{x},{y},{w},{h}",
                    "date": date,
                }
            )
            tick(1)
    return rows


def _file_sink(out: str) -> Callable[[str, bytes], None]:
    """Writes image files under ``out`` (a local folder or an object-store prefix).

    Images are plain writes (no fsync per file: that would cost more than rendering); the
    zoo is complete only once metadata.csv, written atomically at the end, exists.
    """
    if io.is_remote(out):
        fs, bare = io.filesystem(out)

        def put(rel: str, data: bytes) -> None:
            fs.pipe_file(f"{bare.rstrip('/')}/{rel}", data)

        return put
    root = os.path.abspath(os.path.expanduser(out))
    made: set[str] = set()

    def write(rel: str, data: bytes) -> None:
        path = os.path.join(root, rel)
        folder = os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        with open(path, "wb") as f:
            f.write(data)

    return write


def _render_chunk_task(out: str, keys, images_per, size, seed, write_here: bool):
    """Body of one Ray task: render a chunk of individuals. On an object store the task
    writes its images itself; for a local folder it returns them to the driver, which may
    be on another node."""
    files: list[tuple[str, bytes]] = []
    sink = _file_sink(out) if write_here else (lambda rel, data: files.append((rel, data)))
    rows = _render_individuals(keys, images_per, size, seed, sink)
    return rows, files


def _render_with_ray(out, keys, images_per, size, seed, sink, advance) -> list[dict]:
    """Render chunks of individuals as Ray tasks; at most two chunks in flight per CPU (Ray's
    "limit pending tasks with ray.wait" pattern), so the driver's memory does not grow with
    the zoo. Rows come back in key order."""
    import ray

    from reid_ray.runtime import cluster_cpus, init_ray

    init_ray()
    per_chunk = max(1, RAY_CHUNK_IMAGES // images_per)
    chunks = [keys[i : i + per_chunk] for i in range(0, len(keys), per_chunk)]
    task = ray.remote(num_cpus=1)(_render_chunk_task)
    write_here = io.is_remote(out)
    max_in_flight = max(2, int(2 * cluster_cpus()))
    results: dict[int, list[dict]] = {}
    pending: dict = {}
    next_chunk = 0
    while next_chunk < len(chunks) or pending:
        while next_chunk < len(chunks) and len(pending) < max_in_flight:
            ref = task.remote(out, chunks[next_chunk], images_per, size, seed, write_here)
            pending[ref] = next_chunk
            next_chunk += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            rows, files = ray.get(ref)
            for rel, data in files:
                sink(rel, data)
            results[pending.pop(ref)] = rows
            advance(len(rows))
    return [row for i in range(len(chunks)) for row in results[i]]


def generate_zoo(
    out: str,
    *,
    species: int = 3,
    individuals: int = 30,
    images_per: int = 8,
    size: int = 256,
    seed: int = 0,
    split_kind: str = "disjoint",
    progress: Callable[[int, int], None] | None = None,
) -> ZooSummary:
    """Write a toy zoo under ``out``: ``images/<identity>/<image_id>.jpg``, ``metadata.csv``
    (image_id, path relative to ``out``, identity, species, viewpoint, bbox "x,y,w,h",
    date), ``split.csv`` (image_id, split; :func:`reid_ray.data.splits.make_split` of
    ``split_kind``) and ``zoo.json`` (the parameters and counts).

    ``individuals`` is the total over ``species`` species (spread evenly); each gets
    ``images_per`` images of ``size`` x ``size`` px. The same arguments give byte-identical
    files. A previous zoo's metadata is removed first, so a crash never leaves a
    complete-looking zoo behind; the metadata is written last. ``progress(done, total)``
    is called as images are written (the CLI draws it with ``reid_ray.console``).
    """
    from reid_ray.data.splits import make_split, write_split

    _check_args(species, individuals, images_per, size, seed, split_kind)
    t0 = time.perf_counter()
    out = str(out)
    metadata_path = io.join(out, "metadata.csv")
    split_path = io.join(out, "split.csv")
    info_path = io.join(out, "zoo.json")
    io.makedirs(out)
    for stale in (metadata_path, split_path, info_path):
        io.remove(stale)

    counts = individuals_per_species(individuals, species)
    keys = [(s, k) for s in range(species) for k in range(counts[s])]
    n_images = len(keys) * images_per
    sink = _file_sink(out)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, n_images)

    if n_images > RAY_MIN_IMAGES:
        rows = _render_with_ray(out, keys, images_per, size, seed, sink, advance)
    else:
        rows = _render_individuals(keys, images_per, size, seed, sink, advance)

    meta = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    write_split(make_split(meta, kind=split_kind, seed=seed), split_path)
    io.write_bytes_atomic(metadata_path, meta.to_csv(index=False).encode("utf-8"))
    seconds = time.perf_counter() - t0
    summary = ZooSummary(out, metadata_path, split_path, n_images, len(keys), species, seconds)
    params = dict(
        species=species,
        individuals=individuals,
        images_per=images_per,
        size=size,
        seed=seed,
        split_kind=split_kind,
    )
    io.write_bytes_atomic(
        info_path,
        (
            json.dumps(
                {
                    "generator": "reid_ray.synth.generate_zoo",
                    "params": params,
                    "species": [species_of(s).name for s in range(species)],
                    "n_images": n_images,
                    "n_individuals": len(keys),
                    "seconds": round(seconds, 3),
                },
                indent=2,
            )
            + "\n"
        ).encode(),
    )
    logger.info(
        "toy zoo: %d images of %d individuals in %.1f s -> %s", n_images, len(keys), seconds, out
    )
    return summary


# -- preview ----------------------------------------------------------------------------------


def sample_grid(
    zoo_dir: str, png_path: str, individuals: int = 6, images: int = 6, thumb: int = 128
) -> str:
    """Write a PNG grid of a zoo: rows are individuals, columns their first ``images``
    images (``thumb`` px each, labelled with identity and viewpoint). Individuals are taken
    round-robin over the species, so every species shows, then grouped by species. Stored
    with an adaptive 256-colour palette to stay small enough for a README (about 260 KB
    for 6 x 6 tiles of 128 px). Returns ``png_path``."""
    from io import BytesIO

    from PIL import Image

    meta = pd.read_csv(io.join(zoo_dir, "metadata.csv"), dtype=str, keep_default_na=False)
    by_species: dict[str, list[str]] = {}
    for identity, sp in meta[["identity", "species"]].drop_duplicates().itertuples(index=False):
        by_species.setdefault(sp, []).append(identity)
    picked: dict[str, list[str]] = {sp: [] for sp in by_species}
    for depth in range(max(map(len, by_species.values()), default=0)):
        for sp, ids in by_species.items():
            if depth < len(ids) and sum(map(len, picked.values())) < individuals:
                picked[sp].append(ids[depth])
    chosen = [identity for ids in picked.values() for identity in ids]
    if not chosen:
        raise ConfigError(f"no individuals in {zoo_dir}/metadata.csv")
    grid = np.full((len(chosen) * thumb, images * thumb, 3), 255, np.uint8)
    for r, identity in enumerate(chosen):
        rows = meta[meta["identity"] == identity].head(images)
        for c, row in enumerate(rows.itertuples(index=False)):
            data = np.frombuffer(io.read_bytes(io.resolve(row.path, zoo_dir)), np.uint8)
            tile = cv2.resize(
                cv2.imdecode(data, cv2.IMREAD_COLOR), (thumb, thumb), interpolation=cv2.INTER_AREA
            )
            label = f"{identity} {row.viewpoint}" if c == 0 else row.viewpoint
            cv2.rectangle(tile, (0, 0), (thumb, 13), (0, 0, 0), -1)
            cv2.putText(
                tile,
                label,
                (2, 10),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.33,
                (255, 255, 255),
                1,
                cv2.LINE_AA,
            )
            grid[r * thumb : (r + 1) * thumb, c * thumb : (c + 1) * thumb] = tile
    rgb = Image.fromarray(cv2.cvtColor(grid, cv2.COLOR_BGR2RGB))
    pal = rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = BytesIO()
    pal.save(buf, format="PNG", optimize=True)
    io.write_bytes_atomic(png_path, buf.getvalue())
    return png_path
