"""Fine-tuning recipes compared on one dataset: validation mAP before training and after
each epoch, for variants of the training config (head warm-up, backbone learning rate,
frozen backbone BatchNorm), all from the same pretrained model with the same seed.

    python benchmarks/finetune_recipe.py --manifest /work/data/dogfacenet/metadata.csv \\
        --split /work/data/dogfacenet/split.csv --image-size 160 --epochs 4 \\
        --work /work/data/lpft --out benchmarks/results/finetune_recipe_dogfacenet.json

Each variant is one ``reid_ray.train.train`` run in ``WORK/<variant>``; a finished run is
reused (training resumes or skips by itself), so a rerun only adds what is missing. The
validation mAP is leave-one-out over the ``val`` individuals (``reid_ray.train.validate``);
``start`` is the pretrained backbone with the new (random) neck, scored the same way.
"""

from __future__ import annotations

import argparse
import os

from result_record import result_record, write_result  # benchmarks/ is on sys.path

#: variant -> (what it is, TrainConfig overrides)
VARIANTS = {
    "hw0": ("no head warm-up (the recipe before 2026-12-05)", {"head_warmup_epochs": 0}),
    "hw1": ("1 epoch of head warm-up, backbone frozen (the default)", {"head_warmup_epochs": 1}),
    "hw1b01": (
        "head warm-up, then the backbone at 0.1x the learning rate",
        {"head_warmup_epochs": 1, "backbone_lr_mult": 0.1},
    ),
    "hw1fbn": (
        "head warm-up, backbone BatchNorm kept on its pretrained statistics",
        {"head_warmup_epochs": 1, "freeze_backbone_bn": True},
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--model", default="timm:efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", required=True, help="Folder of the runs (one per variant).")
    p.add_argument("--out", required=True, help="JSON file to write.")
    args = p.parse_args()

    from reid_ray.console import setup_logging
    from reid_ray.train import TrainConfig, train

    setup_logging()
    base = dict(model=args.model, image_size=args.image_size, epochs=args.epochs,
                workers=args.workers, batch_size=args.batch_size)  # fmt: skip
    runs = {}
    for name in args.variants:
        what, changes = VARIANTS[name]
        cfg = TrainConfig(**base, **changes).validate()
        s = train(args.manifest, os.path.join(args.work, name), split_path=args.split, config=cfg)
        runs[name] = {
            "what": what,
            "changes": changes,
            "val_mAP_start": s.get("val_mAP_start"),
            "val_mAP": s["val_mAP"],
            "best_epoch": s["best_epoch"],
            "mean_epoch_s": s["timings"]["mean_epoch_s"],
        }
        print(f"{name}: start {s.get('val_mAP_start')}, by epoch {s['val_mAP']}", flush=True)
    result = result_record(
        args,
        "validation mAP (leave-one-out over the val individuals) before training (start) "
        "and after each epoch; same seed, same data order for every variant",
        runs=runs,
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
