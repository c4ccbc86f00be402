"""Could an AL run's answers tell that its fine-tune made the model worse? Measured offline.

For finished AL runs (one round each): the answered pairs' cosine similarities under the
starting model (the round's ``embed`` folder) and under the fine-tuned checkpoint (the train
rows embedded again), scored as a same-vs-different AUROC, next to the test mAP of both
models. The answers were used to refine the pseudo-labels the fine-tune trained on, so this
AUROC flatters the fine-tune; if it still falls where the test mAP falls, a check on a
held-out share of the answers can keep the starting model.

    python benchmarks/al_answer_check.py --manifest M --split S \\
        --runs OUT/work/dogfacenet/active/aas@0.1% ... --out benchmarks/results/al_answer_check.json
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from result_record import result_record, write_result  # benchmarks/ is on sys.path


def pair_auroc(ids: np.ndarray, x: np.ndarray, same, different) -> float | None:
    """AUROC of cosine similarity for "same" (positive) vs "different" pairs of image ids."""
    from sklearn.metrics import roc_auc_score

    from reid_ray.active.graph import l2_normalise

    if not same or not different:
        return None
    row = {i: n for n, i in enumerate(ids.tolist())}
    x = l2_normalise(x)
    labelled = [(a, b, 1) for a, b in same] + [(a, b, 0) for a, b in different]
    kept = [(a, b, y) for a, b, y in labelled if a in row and b in row]
    sims = [float(x[row[a]] @ x[row[b]]) for a, b, _ in kept]
    return float(roc_auc_score([y for _, _, y in kept], sims))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="finished AL run folders")
    p.add_argument(
        "--start-map",
        type=float,
        help="test mAP of the starting model, for runs "
        "that did not evaluate it (benchmark cells: the pretrained cell's)",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from reid_ray import io as rio
    from reid_ray.data import read_manifest
    from reid_ray.embed import EmbedConfig, embed_manifest, read_embeddings
    from reid_ray.runtime import init_ray

    init_ray()
    train = read_manifest(args.manifest, args.split).select_splits("train")
    rows = []
    for run in args.runs:
        metrics = rio.read_json(rio.join(run, "metrics.json"))
        last = metrics["rounds"][-1]
        rdir = rio.join(run, "rounds", f"r{len(metrics['rounds']) - 1}")
        start = read_embeddings(rio.join(rdir, "embed"))
        tuned_dir = rio.join(rdir, "answer_check_embed")
        embed_manifest(train, last["checkpoint"], tuned_dir, EmbedConfig(), command="al")
        tuned = read_embeddings(tuned_dir)
        records = [  # round.json keeps the answers (metrics.json only their counts)
            rio.read_json(rio.join(run, "rounds", f"r{k}", "round.json"))
            for k in range(len(metrics["rounds"]))
        ]
        same = [tuple(pair) for r in records for pair in r["must"]]
        different = [tuple(pair) for r in records for pair in r["cannot"]]
        rows.append({
            "run": os.path.basename(run.rstrip("/")), "same": len(same), "different": len(different),
            "answers_auroc_start": pair_auroc(start.ids.astype(str), start.matrix, same, different),
            "answers_auroc_tuned": pair_auroc(tuned.ids.astype(str), tuned.matrix, same, different),
            "test_mAP_start": (metrics.get("start") or {}).get("mAP", args.start_map), "test_mAP_tuned": last["mAP"],
        })  # fmt: skip
        print(rows[-1], flush=True)
    write_result(
        args.out,
        result_record(
            args,
            "AUROC of cosine similarity, answered 'same' vs 'different' pairs of the train rows, "
            "under the starting model and the fine-tuned one; test mAP of both",
            private=("out",),
            runs=rows,
        ),
    )


if __name__ == "__main__":
    main()
