"""How hard is a toy zoo? Two reference scores on its query/gallery split.

* ``random_net``: a random-init timm ResNet-18 (``torch.manual_seed(0)``), whole image
  resized to 128 px, ImageNet mean/std, cosine nearest neighbour. It sees colour, shape and
  layout but cannot read a pattern, so it should score low (near the species-level chance).
* ``sift``: OpenCV SIFT + Lowe's ratio test + a MAGSAC homography; the gallery image with
  the most inliers wins. It reads the pattern's geometry, so it should score high.

Run: ``python -m reid_ray.synth.difficulty ZOO_DIR`` (prints JSON). The figures quoted in
docs/results/demo.md come from this module.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import cv2
import numpy as np
import pandas as pd

from reid_ray import io
from reid_ray.data.splits import read_split
from reid_ray.evaluation.metrics import retrieval_metrics_from_similarity


def query_gallery(zoo_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The known queries and the gallery of a zoo's split file (``query_unknown`` rows have
    no match in the gallery and are left out of top-1)."""
    meta = pd.read_csv(io.join(zoo_dir, "metadata.csv"), dtype=str, keep_default_na=False)
    meta = meta.merge(read_split(io.join(zoo_dir, "split.csv")), on="image_id")
    meta["file"] = [io.resolve(p, zoo_dir) for p in meta["path"]]
    return (
        meta[meta["split"] == "query"].reset_index(drop=True),
        meta[meta["split"] == "gallery"].reset_index(drop=True),
    )


def _read(path: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(io.read_bytes(path), np.uint8), flags)


def random_net_similarity(query_files, gallery_files, input_size: int = 128) -> np.ndarray:
    """Cosine similarity [Q, G] of random-init ResNet-18 embeddings."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)

    def embed(files) -> np.ndarray:
        out = []
        for i in range(0, len(files), 64):
            batch = []
            for f in files[i : i + 64]:
                rgb = cv2.cvtColor(_read(f), cv2.COLOR_BGR2RGB)
                rgb = cv2.resize(rgb, (input_size, input_size), interpolation=cv2.INTER_AREA)
                batch.append(((rgb.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
            with torch.no_grad():
                emb = model(torch.from_numpy(np.stack(batch)))
            out.append(torch.nn.functional.normalize(emb, dim=1).numpy())
        return np.concatenate(out)

    return embed(list(query_files)) @ embed(list(gallery_files)).T


def model_similarity(query_files, gallery_files, ref: str) -> np.ndarray:
    """Cosine similarity [Q, G] of the embeddings of any model reference
    (:func:`reid_ray.models.load`), e.g. the offline ImageNet ``timm:efficientnet_lite0`` or
    a checkpoint written by ``reid-ray train``; the model's own preprocessing."""
    import torch

    from reid_ray.models import load

    loaded = load(ref)
    pre = loaded.preprocess

    def embed(files) -> np.ndarray:
        out = []
        for i in range(0, len(files), 32):
            batch = np.stack(
                [pre.prepare(cv2.cvtColor(_read(f), cv2.COLOR_BGR2RGB)) for f in files[i : i + 32]]
            )
            with torch.no_grad():
                emb = loaded.model(pre.normalize(batch))
            out.append(torch.nn.functional.normalize(emb, dim=1).numpy())
        return np.concatenate(out)

    return embed(list(query_files)) @ embed(list(gallery_files)).T


def sift_features(img: np.ndarray, sift=None) -> tuple[np.ndarray, np.ndarray | None]:
    """SIFT keypoint coordinates (N, 2) and RootSIFT descriptors (N, 128) of a BGR image."""
    sift = sift or cv2.SIFT_create()
    kps, desc = sift.detectAndCompute(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), None)
    if desc is None:
        return np.zeros((0, 2), np.float32), None
    desc = np.sqrt(desc / (desc.sum(axis=1, keepdims=True) + 1e-7))
    return np.array([k.pt for k in kps], np.float32), desc.astype(np.float32)


def sift_inliers(a, b, ratio: float = 0.8, threshold: float = 4.0) -> int:
    """Inliers of a MAGSAC homography between two images' :func:`sift_features` after the
    ratio test: the number of pattern points that agree on one geometric mapping."""
    (pa, da), (pb, db) = a, b
    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return 0
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(da, db, k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    if len(good) < 4:
        return 0
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    h_mat, mask = cv2.findHomography(
        src, dst, cv2.USAC_MAGSAC, threshold, maxIters=2000, confidence=0.999
    )
    return 0 if h_mat is None or mask is None else int(mask.sum())


def sift_similarity(query_files, gallery_files) -> np.ndarray:
    """Inlier counts [Q, G] (every query against every gallery image)."""
    sift = cv2.SIFT_create()
    gallery = [sift_features(_read(f), sift) for f in gallery_files]
    sim = np.zeros((len(query_files), len(gallery)), np.float64)
    for q, f in enumerate(query_files):
        feats = sift_features(_read(f), sift)
        sim[q] = [sift_inliers(feats, g) for g in gallery]
    return sim


def difficulty(zoo_dir: str, methods=("random_net", "sift"), models=()) -> dict:
    """top-1/top-5/mAP of each reference method (and of each model reference in ``models``)
    on the zoo's known queries vs its gallery, with the species-level chance (the expected
    top-1 of a method that knows the species but nothing else) for comparison."""
    queries, gallery = query_gallery(zoo_dir)
    n_per_species = gallery.groupby("species")["identity"].nunique()
    report: dict = {
        "zoo": zoo_dir,
        "n_queries": len(queries),
        "n_gallery": len(gallery),
        "gallery_identities": int(gallery["identity"].nunique()),
        "species_chance_top1": float(np.mean([1.0 / n_per_species[s] for s in queries["species"]])),
    }
    fns = {"random_net": random_net_similarity, "sift": sift_similarity}
    fns.update({ref: (lambda q, g, ref=ref: model_similarity(q, g, ref)) for ref in models})
    for name in (*methods, *models):
        t0 = time.perf_counter()
        sim = fns[name](queries["file"], gallery["file"])
        m = retrieval_metrics_from_similarity(sim, queries["identity"], gallery["identity"])
        report[name] = {k: m[k] for k in ("top1", "top5", "mAP")}
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo_dir")
    parser.add_argument(
        "--methods", default="random_net,sift", help="comma-separated: random_net, sift"
    )
    parser.add_argument(
        "--model", action="append", default=[], help="also score this model reference (repeatable)"
    )
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    report = difficulty(args.zoo_dir, methods, tuple(args.model))
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
