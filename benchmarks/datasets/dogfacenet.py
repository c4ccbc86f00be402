"""Build the DogFaceNet manifest and open-set split from a local copy of its repository.

    python benchmarks/datasets/dogfacenet.py --repo /work/.mirror/fcernafukuzaki+DogFaceNet-Dataset/repo \
        --out /work/data/dogfacenet [--seed 0]

The public repository ``fcernafukuzaki/DogFaceNet-Dataset`` holds 6,316 aligned 224 px dog-face
crops of 1,298 dogs under ``data/dogfacenet/aligned/after_4_bis/<dog id>/``; its other image
folders are mostly byte-identical copies and are left out. ``--repo`` is a bare git mirror or a
checkout (read with ``git ls-tree`` / ``git cat-file``, so no work tree is needed). Only that
folder's images are written, under ``OUT/images/<dog id>/``, OUTSIDE this repository (the
original DogFaceNet data is CC BY 4.0; never commit the images).

Writes ``OUT/metadata.csv`` (image_id, path relative to OUT, identity = the folder name,
species = dog) and ``OUT/split.csv``: :func:`reid_ray.data.make_split` ``disjoint`` (seeded by
SHA-256, identical on every machine): train / val identities for fine-tuning, disjoint from
the test identities; of those, some dogs appear only as ``query_unknown`` (the right answer is
"new"), the others give ``query`` and ``gallery`` images (a dog with one image is never a known
query). No dates: no cross-session split. Re-running skips images already extracted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import pandas as pd

from reid_ray.data import make_split, write_split

logger = logging.getLogger("dogfacenet")
PREFIX = "data/dogfacenet/aligned/after_4_bis/"


def git_dir(repo: str) -> str:
    """The git directory of a bare mirror or a checkout."""
    dot_git = os.path.join(repo, ".git")
    return dot_git if os.path.isdir(dot_git) else repo


def list_images(gdir: str) -> pd.DataFrame:
    """Blob id, path and identity of every image of the aligned folder at HEAD."""
    listing = subprocess.run(
        ["git", "--git-dir", gdir, "ls-tree", "-r", "HEAD", "--", PREFIX],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    rows = []
    for line in listing.splitlines():
        meta, path = line.split("\t", 1)
        _, kind, blob = meta.split()
        parts = path[len(PREFIX) :].split("/")
        if kind != "blob" or len(parts) != 2 or not parts[1].lower().endswith((".jpg", ".png")):
            continue
        rows.append({"blob": blob, "repo_path": path, "identity": parts[0], "file": parts[1]})
    if not rows:
        sys.exit(f"no images under {PREFIX} in {gdir}: is this the DogFaceNet-Dataset repository?")
    return pd.DataFrame(rows)


def extract(gdir: str, images: pd.DataFrame, out: str) -> int:
    """Write each blob to OUT/images/<identity>/<file> through one ``git cat-file --batch``."""
    todo = [
        (r.blob, os.path.join(out, "images", r.identity, r.file))
        for r in images.itertuples()
        if not os.path.exists(os.path.join(out, "images", r.identity, r.file))
    ]
    if not todo:
        return 0
    proc = subprocess.Popen(
        ["git", "--git-dir", gdir, "cat-file", "--batch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    for blob, dest in todo:
        proc.stdin.write(f"{blob}\n".encode())
        proc.stdin.flush()
        header = proc.stdout.readline().split()
        if len(header) != 3:
            sys.exit(f"git cat-file could not read blob {blob}: {header!r}")
        data = proc.stdout.read(int(header[2]))
        proc.stdout.read(1)  # the newline after each object
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = dest + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    proc.stdin.close()
    proc.wait()
    return len(todo)


def build(
    repo: str,
    out: str,
    *,
    seed: int = 0,
    unknown_fraction: float = 0.2,
    train_fraction: float = 0.5,
    val_fraction: float = 0.05,
) -> dict:
    """Extract, write the manifest and the split; returns the counts."""
    gdir = git_dir(repo)
    images = list_images(gdir)
    os.makedirs(out, exist_ok=True)
    n_new = extract(gdir, images, out)
    manifest = pd.DataFrame(
        {
            "image_id": "dog"
            + images["identity"]
            + "-"
            + images["file"].str.rsplit(".", n=1).str[0],
            "path": "images/" + images["identity"] + "/" + images["file"],
            "identity": "dog" + images["identity"],
            "species": "dog",
        }
    ).sort_values("image_id", kind="stable")
    manifest.to_csv(os.path.join(out, "metadata.csv"), index=False)
    split = make_split(
        manifest, kind="disjoint", seed=seed, train_fraction=train_fraction,
        val_fraction=val_fraction, unknown_fraction=unknown_fraction, queries_per_identity=2,
    )  # fmt: skip
    write_split(split, os.path.join(out, "split.csv"))
    per_dog = manifest.groupby("identity").size()
    counts = {
        "images": len(manifest),
        "dogs": int(per_dog.size),
        "images_per_dog_min": int(per_dog.min()),
        "images_per_dog_max": int(per_dog.max()),
        "extracted_now": n_new,
        "split": split["split"].value_counts().to_dict(),
        "seed": seed,
        "source": f"git:{PREFIX} of {repo}",
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(counts, f, indent=2)
    return counts


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="Bare mirror or checkout of the repository.")
    parser.add_argument(
        "--out", default="/work/data/dogfacenet", help="Data folder (not the repo)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unknown-fraction", type=float, default=0.2)
    args = parser.parse_args()
    counts = build(args.repo, args.out, seed=args.seed, unknown_fraction=args.unknown_fraction)
    logger.info(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
