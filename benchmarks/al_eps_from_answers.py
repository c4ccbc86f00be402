"""Should the answered pairs choose DBSCAN's radius (eps)? Measured offline, and rejected.

Model selection for semi-supervised clustering scores each parameter by the constraints it
satisfies. Here: on one embedding set of the training rows (an AL run's round-0
``embed`` folder), DBSCAN over a grid of eps, each sampler's pairs answered from the hidden
identities, eps chosen by balanced constraint accuracy (mean of must-links kept together
and cannot-links kept apart), then the usual refinement; pseudo-label ARI against the
identities, next to the refinement at the default eps. Also measured: the refinement's
merge policies at the default eps (``ari_refined_items`` / ``_clusters`` / ``_mutual``:
what one must-link across two clusters moves; ``mutual`` is the shipped default).

    python benchmarks/al_eps_from_answers.py \\
        --embed OUT/work/dogfacenet/active/usl/rounds/r0/embed \\
        --manifest /work/data/dogfacenet/metadata.csv --out benchmarks/results/al_eps_from_answers.json
"""

from __future__ import annotations

import argparse

import numpy as np
from result_record import result_record, write_result  # benchmarks/ is on sys.path


def constraint_accuracy(labels, must, cannot) -> float:
    """Balanced: mean of the share of must-links together and of cannot-links apart."""
    parts = []
    if must:
        parts.append(np.mean([labels[a] == labels[b] and labels[a] >= 0 for a, b in must]))
    if cannot:
        parts.append(np.mean([labels[a] != labels[b] or labels[a] < 0 for a, b in cannot]))
    return float(np.mean(parts)) if parts else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embed", required=True, help="an embeddings folder of the train rows")
    p.add_argument("--manifest", required=True, help="manifest with the hidden identities")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.00033, 0.001, 0.005])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from reid_ray.active.clustering import ClusterConfig, cluster_all, dbscan_sparse
    from reid_ray.active.constraints import DEFAULT_MERGE, MERGE_POLICIES, refine
    from reid_ray.active.graph import jaccard_distance
    from reid_ray.active.samplers import Known, budget_pairs, sample_pairs
    from reid_ray.data import read_manifest
    from reid_ray.embed import read_embeddings
    from reid_ray.evaluation import cluster_metrics

    emb = read_embeddings(args.embed)
    ids, x = emb.ids.astype(str), emb.matrix
    table = read_manifest(args.manifest).table
    identity = dict(zip(table["image_id"].to_pylist(), table["identity"].to_pylist(), strict=True))
    truth = np.array([identity[i] for i in ids])
    cfg = ClusterConfig()
    clusterings = cluster_all(x, cfg)
    dist = jaccard_distance(clusterings.graph, cfg.k1, cfg.k2)
    grid = [round(float(e), 2) for e in np.arange(0.2, 0.81, 0.05)]
    labels = {e: dbscan_sparse(dist, e, cfg.min_samples) for e in grid}

    def ari(lab):
        return cluster_metrics(truth, lab, noise_label=-1)["ari"]

    by_eps = {e: {"ari": ari(labels[e]), "noise": int((labels[e] < 0).sum())} for e in grid}
    runs = []
    for budget in args.budgets:
        count = budget_pairs(budget, len(ids))
        for sampler in ("random", "margin", "aas"):
            for seed in args.seeds:
                pairs = sample_pairs(
                    sampler, x, clusterings, count, known=Known(len(ids)), seed=seed
                )
                must = [(a, b) for a, b in pairs if truth[a] == truth[b]]
                cannot = [(a, b) for a, b in pairs if truth[a] != truth[b]]
                score = {e: constraint_accuracy(labels[e], must, cannot) for e in grid}
                best = max(grid, key=lambda e: (round(score[e], 6), -abs(e - cfg.eps)))
                by_policy = {policy: ari(refine(labels[cfg.eps], must, cannot, x,
                                                merge=policy).labels)
                             for policy in MERGE_POLICIES}  # fmt: skip
                runs.append({
                    "budget": budget, "sampler": sampler, "seed": seed, "pairs": len(pairs),
                    "same": len(must), "chosen_eps": best,
                    "ari_refined_default_eps": by_policy[DEFAULT_MERGE],
                    "ari_refined_chosen_eps": ari(refine(labels[best], must, cannot, x).labels),
                    **{f"ari_refined_{policy}": v for policy, v in by_policy.items()},
                })  # fmt: skip
                print(runs[-1], flush=True)
    write_result(
        args.out,
        result_record(
            args,
            "pseudo-label ARI of the train rows against their hidden identities: DBSCAN "
            "(k-reciprocal Jaccard) per eps without answers, and after refinement with each "
            "sampler's answered pairs at the default eps vs at the eps the answers choose; "
            "ari_refined_<policy>: the refinement's merge policies at the default eps",
            private=("out",),
            default_eps=cfg.eps,
            by_eps=by_eps,
            runs=runs,
        ),
    )


if __name__ == "__main__":
    main()
