"""Training input, side by side: the former per-epoch decode against the shard feed.

One run, the same images, the same model, the same machine: ``reid_ray.train.train`` with
``feed: decode`` (every epoch reads and decodes the original files on at most 8 half-CPU
tasks, after one extra pass that finds the bad images) and with ``feed: shards`` (each
image decoded, cropped and resized once into Parquet shards, the small images streamed
every epoch). Both stream (``decoded_cache_mb: 0``), as a 140k-image set does: nothing
is kept decoded in the object store between epochs.

The images are camera-trap-like frames: each toy-zoo animal (``reid-ray synth``, 256 px)
pasted at a random place on a larger textured background, its bbox in the manifest, so
decoding the frame and cropping the animal is real work. ``images_per_s`` of an epoch is
what the training loop measured (its images over its wall time, data waits included).

    PYTHONPATH=$PWD python benchmarks/train_input.py --work /tmp/train-input

writes ``benchmarks/results/train_input.json`` and ``docs/results/train_input.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("train_input")
FEEDS = ("decode", "shards")


def make_frames(work: str, images: int, frame: tuple[int, int], seed: int = 0) -> str:
    """A toy zoo of ``images`` animals, each pasted into a ``frame`` (w, h) JPEG with its
    bbox; returns the manifest (reused when it is there)."""
    from PIL import Image

    from reid_ray.data import read_manifest
    from reid_ray.synth import generate_zoo

    manifest = os.path.join(work, "frames", "metadata.csv")
    if os.path.exists(manifest):
        return manifest
    per = 10
    zoo_manifest = os.path.join(work, "zoo", "metadata.csv")
    if not os.path.exists(zoo_manifest):
        generate_zoo(
            os.path.join(work, "zoo"), species=3, individuals=max(3, images // per),
            images_per=per, size=256, seed=seed,
        )  # fmt: skip
    table = read_manifest(zoo_manifest).table
    rng = np.random.default_rng(seed)
    w, h = frame
    # a few smooth random backgrounds with some grain: they compress like photos, not noise
    backgrounds = []
    for _ in range(8):
        small = rng.integers(0, 256, (h // 64 + 1, w // 64 + 1, 3), dtype=np.uint8)
        bg = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-8, 9, bg.shape, dtype=np.int16)
        backgrounds.append(Image.fromarray(np.clip(bg + grain, 0, 255).astype(np.uint8)))
    os.makedirs(os.path.join(work, "frames", "img"), exist_ok=True)
    rows = []
    boxes = table["bbox"].to_pylist() if "bbox" in table.column_names else [None] * table.num_rows
    for image_id, path, identity, box in zip(
        table["image_id"].to_pylist(),
        table["path"].to_pylist(),
        table["identity"].to_pylist(),
        boxes,
        strict=True,
    ):
        animal = Image.open(path).convert("RGB")
        img = backgrounds[int(rng.integers(len(backgrounds)))].copy()
        x, y = int(rng.integers(0, w - animal.width)), int(rng.integers(0, h - animal.height))
        img.paste(animal, (x, y))
        out = os.path.join(work, "frames", "img", f"{image_id}.jpg")
        img.save(out, quality=90)
        bx, by, bw, bh = box if box is not None else (0, 0, animal.width, animal.height)
        rows.append(
            {"image_id": image_id, "path": out, "identity": identity,
             "bbox": f"{x + bx:g},{y + by:g},{bw:g},{bh:g}"}
        )  # fmt: skip
    tmp = manifest + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest


def run_one(manifest: str, out: str, feed: str, model: str, image_size: int, epochs: int, n: int):
    from reid_ray.train import TrainConfig, train

    cfg = TrainConfig(
        model=model, image_size=image_size, epochs=epochs, workers=2, batch_size=16,
        feed=feed, decoded_cache_mb=0, calibration_fraction=0.0, head_warmup_epochs=0.0,
    )  # fmt: skip
    if n:
        import pandas as pd

        sub = os.path.join(os.path.dirname(out), f"manifest-{n}.csv")
        if not os.path.exists(sub):
            pd.read_csv(manifest, dtype=str).head(n).to_csv(sub, index=False)
        manifest = sub
    t0 = time.perf_counter()
    s = train(manifest, out, config=cfg, resume=False)
    return summary_row(s, feed, model, image_size, time.perf_counter() - t0)


def summary_row(s: dict, feed: str, model: str, image_size: int, wall: float) -> dict:
    """One benchmark row from a run's ``metrics.json`` content."""
    return {
        "feed": feed,
        "model": model,
        "image_size": image_size,
        "train_images": s["counts"]["train_images"],
        "errors": s["counts"]["errors"],
        "epochs": [
            {
                "epoch": h["epoch"],
                "images": h["images"],
                "train_s": h["train_s"],
                "images_per_s": h["images_per_s"],
            }
            for h in s["history"]
        ],  # fmt: skip
        "prepare_s": s["timings"]["prepare_s"],
        "fit_s": s["timings"]["fit_s"],
        "wall_s": round(wall, 2),
        "feed_info": s.get("feed"),
        "per_worker": s["resources"]["per_worker"],
    }


def _later_epochs_rate(r: dict) -> float:
    """Mean images/s of the epochs after the first (the first one warms up both paths)."""
    later = r["epochs"][1:] or r["epochs"]
    return sum(e["images"] for e in later) / sum(e["train_s"] for e in later)


def write_markdown(path: str, result: dict) -> None:
    lines = [
        "# Training input: per-epoch decode vs. shards",
        "",
        f"Measured {result['date']} on {result['machine']}, load before: "
        f"`{result['uptime_before']}`, after: `{result['uptime_after']}`.",
        "",
        *([result["note"], ""] if result.get("note") else []),
        "```",
        result["command"],
        "```",
        "",
        f"{result['frames']} frames of {result['frame'][0]}x{result['frame'][1]} px, each with "
        "one toy-zoo animal (256 px) and its bbox; 2 Ray Train workers, batch 16, both feeds "
        "streaming (`decoded_cache_mb: 0`). images/s per epoch as the training loop measured "
        "it (data waits included); the ratio is of the mean over epochs 2+.",
        "",
        "| model | px | feed | images | prepare s | images/s by epoch | epochs 2+ images/s "
        "| ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for r in (row["decode"], row["shards"]):
            rates = ", ".join(f"{e['images_per_s']:.1f}" for e in r["epochs"])
            ratio = f"**{row['ratio']:.2f}x**" if r["feed"] == "shards" else ""
            lines.append(
                f"| {r['model']} | {r['image_size']} | {r['feed']} | {r['train_images']} | "
                f"{r['prepare_s']:.1f} | {rates} | {_later_epochs_rate(r):.1f} | {ratio} |"
            )
    lines += [
        "",
        "`prepare s` is the work before the first step: for `decode` the extra full pass "
        "that finds the bad images, for `shards` the one-time decode into shards (a rerun, "
        "or another run with the same input size, reuses them: 0 images decoded).",
        "",
        "Raw figures: `benchmarks/results/train_input.json`.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _shown(argv: list[str]) -> list[str]:
    """The command's arguments less ``--note`` (recorded on its own)."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--note":
            skip = a == "--note"
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/reid-ray-train-input")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--frame", type=int, nargs=2, default=[1280, 960], metavar=("W", "H"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--tiny-model", default="timm-random:resnet18")
    p.add_argument("--tiny-size", type=int, default=32)
    p.add_argument("--real-model", default="timm:efficientnet_lite0")
    p.add_argument("--real-size", type=int, default=128)
    p.add_argument("--real-images", type=int, default=240, help="0: skip the real-model row")
    p.add_argument("--real-epochs", type=int, default=2)
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks/results/train_input.json"))
    p.add_argument("--md", default=os.path.join(REPO, "docs/results/train_input.md"))
    p.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: write the JSON and Markdown from the runs already in --work",
    )
    p.add_argument("--note", default="", help="recorded with the figures (e.g. the load seen)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import ray

    from reid_ray.runtime import init_ray

    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    os.makedirs(args.work, exist_ok=True)
    rows = []
    plans = [(args.tiny_model, args.tiny_size, args.epochs, args.images)]
    if args.real_images:
        plans.append((args.real_model, args.real_size, args.real_epochs, args.real_images))

    def out_dir(model: str, size: int, feed: str) -> str:
        return os.path.join(args.work, f"out-{model.split(':')[-1]}-{size}-{feed}")

    if args.collect:
        for model, size, _, _ in plans:
            paths = {f: os.path.join(out_dir(model, size, f), "metrics.json") for f in FEEDS}
            if not all(os.path.exists(p) for p in paths.values()):
                continue
            row = {}
            for feed, path in paths.items():
                with open(path) as f:
                    s = json.load(f)
                row[feed] = summary_row(s, feed, model, size, s["timings"]["total_s"])
            rows.append(row)
    else:
        manifest = make_frames(args.work, args.images, tuple(args.frame))
        init_ray()
        try:
            for model, size, epochs, n in plans:
                row = {}
                for feed in FEEDS:
                    logger.info("training %s at %d px, feed %s", model, size, feed)
                    out = out_dir(model, size, feed)
                    row[feed] = run_one(manifest, out, feed, model, size, epochs, n)
                    logger.info("%s", json.dumps(row[feed]["epochs"]))
                rows.append(row)
        finally:
            ray.shutdown()
    for row in rows:
        row["ratio"] = _later_epochs_rate(row["shards"]) / _later_epochs_rate(row["decode"])
    result = {
        "benchmark": "train_input",
        "command": "PYTHONPATH=$PWD python benchmarks/train_input.py "
        + " ".join(_shown(sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "uptime_before": uptime_before,
        "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "frames": args.images,
        "frame": list(args.frame),
        "note": args.note,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    os.makedirs(os.path.dirname(args.md), exist_ok=True)
    write_markdown(args.md, result)
    for row in rows:
        print(
            f"{row['decode']['model']} {row['decode']['image_size']} px: decode "
            f"{_later_epochs_rate(row['decode']):.0f} img/s, shards "
            f"{_later_epochs_rate(row['shards']):.0f} img/s, ratio {row['ratio']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
