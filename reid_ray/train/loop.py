"""The per-worker training function run by Ray Train's ``TorchTrainer``.

Each worker builds the network (timm backbone + pooling + neck, with the start weights
the driver loaded through ``reid_ray.models.load``) and the sub-centre ArcFace head,
wraps both in one module so DDP averages the ArcFace weights' gradients too, and
trains on its shard of the ``train`` dataset. Rank 0 validates on the ``val`` rows and
writes the checkpoint of each epoch: ``model.pt`` (a reid-ray checkpoint, usable as
``--model``) and ``state.pt`` (optimiser, schedule, history) to resume from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import nn

from reid_ray.config import from_dict
from reid_ray.models import CHECKPOINT_FILE, NetConfig, Preprocess, ReidNet, save_checkpoint
from reid_ray.runtime import set_threads
from reid_ray.train.augment import TrainAugment
from reid_ray.train.config import TrainConfig
from reid_ray.train.losses import DynamicSubCenterArcFaceLoss
from reid_ray.train.sampler import stream_pk_batches
from reid_ray.train.validate import embed_batches, leave_one_out_metrics

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


class ArcFaceModel(nn.Module):
    """Network + ArcFace head in one module: ``forward(images, labels) -> loss``.

    The loss runs outside autocast on float32 embeddings (PML casts its weights to the
    embeddings' dtype, which would turn them half precision under AMP).
    """

    def __init__(self, net: ReidNet, head: DynamicSubCenterArcFaceLoss):
        super().__init__()
        self.net = net
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.net(images)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.head(emb.float(), labels)


class ImageLabelCollate(NumpyBatchCollateFn):
    """Keep only what training needs: uint8 images and int64 labels, as tensors."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {
            "image": torch.from_numpy(np.ascontiguousarray(batch["image"])),
            "label": torch.from_numpy(np.asarray(batch["label"], dtype=np.int64)),
        }


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to ``min_ratio`` at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factors(step: int, *, cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """LR multipliers of the backbone, neck and head groups (:func:`param_groups`) at ``step``.

    The neck and head follow :func:`warmup_cosine` over the whole run. The backbone stays at
    0 for ``head_warmup_epochs``, then gets its own warmup, at most a third of what is left
    (a whole-epoch warmup in a 2-epoch run would end the run at the peak rate), and a
    cosine down to the same end as the others.
    """
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    frozen = head_warmup_steps(cfg, steps_per_epoch)
    rest = warmup_cosine(step, warmup_steps=warmup, total_steps=total, min_ratio=cfg.min_lr_ratio)
    if step < frozen:
        backbone = 0.0
    else:
        left = max(1, total - frozen)
        backbone = warmup_cosine(
            step - frozen,
            warmup_steps=min(warmup, left // 3),
            total_steps=left,
            min_ratio=cfg.min_lr_ratio,
        )
    return [backbone, rest, rest]


def head_warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimiser steps during which the backbone is frozen: ``head_warmup_epochs``, at
    most half the run's steps."""
    return int(round(min(cfg.head_warmup_epochs, cfg.epochs / 2) * steps_per_epoch))


def set_backbone_mode(backbone: nn.Module, training: bool, cfg: TrainConfig) -> None:
    """Train or eval mode for the backbone; with ``freeze_backbone_bn`` its BatchNorm
    layers stay in eval mode (pretrained running statistics, not the batch's)."""
    backbone.train(training)
    if training and cfg.freeze_backbone_bn:
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def build_net(net_cfg: NetConfig, state_dict: dict) -> ReidNet:
    """The network with the start weights the driver built through ``models.load``."""
    net = ReidNet(net_cfg)
    net.load_state_dict(state_dict, strict=True)
    return net


def param_groups(model: ArcFaceModel, cfg: TrainConfig) -> list[dict]:
    """Backbone, neck/pooling and ArcFace weights, each with its own learning rate."""
    net = model.net
    backbone = list(net.backbone.parameters())
    ids = {id(p) for p in backbone}
    rest = [p for p in net.parameters() if id(p) not in ids]
    return [
        {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult},
        {"params": rest, "lr": cfg.lr},
        {"params": list(model.head.parameters()), "lr": cfg.lr * cfg.head_lr_mult},
    ]


def _unwrap(module: nn.Module) -> ArcFaceModel:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _epoch_batches(shard, cfg: TrainConfig, epoch: int, rank: int, device):
    """One epoch of ``{"image", "label"}`` tensors from this worker's shard."""
    seed = cfg.seed * 100_003 + epoch * 101 + rank
    if cfg.sampler == "pk":
        rng = np.random.default_rng(seed)
        p = cfg.batch_size // cfg.pk_k
        window = max(cfg.shuffle_buffer, 8 * cfg.batch_size)
        stream = shard.iter_batches(batch_size=64, batch_format="numpy")
        for b in stream_pk_batches(stream, p, cfg.pk_k, rng, window):
            yield {"image": torch.from_numpy(b["image"]), "label": torch.from_numpy(b["label"])}
        return
    yield from shard.iter_torch_batches(
        batch_size=cfg.batch_size,
        drop_last=True,
        local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=seed,
        collate_fn=ImageLabelCollate(),
        device=device,
        pin_memory=device.type == "cuda",
    )


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_loop(loop_cfg: dict) -> None:
    """Ray Train worker entry point; ``loop_cfg`` is built by :mod:`reid_ray.train.trainer`."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, loop_cfg["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    set_threads(int(loop_cfg["threads"]))
    device = ray.train.torch.get_device()
    use_amp = cfg.amp and device.type == "cuda"
    preprocess = Preprocess.from_dict(loop_cfg["preprocess"])
    net_cfg = NetConfig.from_dict(loop_cfg["net"])

    torch.manual_seed(cfg.seed)
    net = build_net(net_cfg, ray.get(loop_cfg["state_ref"]))
    head = DynamicSubCenterArcFaceLoss(
        num_classes=int(loop_cfg["num_classes"]),
        embedding_size=net.embedding_dim,
        margins=loop_cfg["class_margins"],
        scale=cfg.loss.scale,
        sub_centers=cfg.loss.sub_centers,
    )
    model = ArcFaceModel(net, head)

    state = None
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        logger.info("rank %d resumes after epoch %d", rank, start_epoch)

    model = ray.train.torch.prepare_model(model)
    core = _unwrap(model)
    optimizer = torch.optim.AdamW(param_groups(core, cfg), weight_decay=cfg.weight_decay)
    steps_per_epoch = int(loop_cfg["steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [
            lambda step, g=g: lr_factors(step, cfg=cfg, steps_per_epoch=steps_per_epoch)[g]
            for g in range(len(optimizer.param_groups))
        ],
    )
    frozen_steps = head_warmup_steps(cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])

    augment = TrainAugment(cfg.augment, preprocess.input_size, preprocess.mean, preprocess.std).to(
        device
    )
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_cfg["has_val"] and rank == 0 else None

    def validate() -> dict:
        tv = time.perf_counter()
        emb, ids = embed_batches(
            core.net,
            val_shard.iter_batches(batch_size=cfg.val_batch_size, batch_format="numpy"),
            preprocess,
            device,
        )
        val = leave_one_out_metrics(emb, ids, top_k=cfg.val_top_k)
        val = {f"val_{k}": v for k, v in val.items()}
        val["val_s"] = round(time.perf_counter() - tv, 3)
        return val

    # the start point (pretrained backbone, new neck) scored the same way as every epoch
    start_val = validate() if val_shard is not None and start_epoch == 0 else {}

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)
        model.train()
        loss_sum, n_images, n_steps = 0.0, 0, 0
        for batch in _epoch_batches(train_shard, cfg, epoch, rank, device):
            # frozen backbone: its BatchNorm statistics stay the pretrained ones too
            set_backbone_mode(core.net.backbone, scheduler.last_epoch >= frozen_steps, cfg)
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            x = augment(images)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = model(x, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(labels)
            n_images += len(labels)
            n_steps += 1
        train_s = time.perf_counter() - t0
        loss_sum, n_images_all = _all_reduce_sum([loss_sum, float(n_images)], device)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / n_images_all if n_images_all else float("nan"),
            "images": int(n_images_all),
            "steps": n_steps,
            "lr": optimizer.param_groups[1]["lr"],
            "backbone_lr": optimizer.param_groups[0]["lr"],
            "train_s": round(train_s, 3),
            "images_per_s": round(n_images_all / train_s, 2) if train_s > 0 else None,
            "attempt": loop_cfg["attempt"],
        }
        if rank != 0:
            ray.train.report(record)
            continue

        val = validate() if val_shard is not None else {}
        if epoch == 0 and start_val:
            val["val_mAP_start"] = start_val.get("val_mAP")
            val["val_top1_start"] = start_val.get("val_top1")
        record.update(val)
        val_map = record.get("val_mAP")
        has_score = val_map is not None and math.isfinite(val_map)
        record["score"] = val_map if has_score else -record["train_loss"]
        record["epoch_s"] = round(time.perf_counter() - t0, 3)
        history.append(record)

        with tempfile.TemporaryDirectory(prefix="rr-ckpt-") as tmp:
            meta = dict(
                loop_cfg["meta"], epoch=epoch + 1, val_mAP=val_map, train_loss=record["train_loss"]
            )
            save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), core.net, preprocess, meta)
            torch.save(
                {
                    "model": core.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                },
                os.path.join(tmp, STATE_FILE),
            )
            with open(os.path.join(tmp, HISTORY_FILE), "w") as f:
                json.dump(history, f, indent=1, default=str)
            ray.train.report(
                record,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"epoch_{epoch + 1:04d}",
            )
