"""Active learning for re-identification: complementary clusterings, ambiguity-aware pair
sampling, must-link / cannot-link answers and constrained refinement of pseudo-labels.

Pure parts (no Ray): ``graph`` (FAISS k-NN graph, sparse Jaccard distances),
``clustering`` (DBSCAN/FINCH/k-means, USL pseudo-labels), ``samplers`` (budgets,
random/margin/aas), ``constraints`` (refinement), ``oracle`` (simulated oracle, the pairs
and answers files), ``views`` (the pair as a person sees it: cropped to the boxes, whole
frames), ``annotate`` (the local annotation page, the one writer of the answers),
``outputs`` (round records, the pseudo-labelled manifest and its constraints). ``runner``
drives the rounds (embed, cluster, sample, ask, refine, fine-tune, evaluate when labels
allow) through the other stages' public entry points. Names are imported on first use.
"""

from reid_ray.lazy import lazy_getattr

_EXPORTS = {
    "KnnGraph": "graph",
    "jaccard_distance": "graph",
    "knn_graph": "graph",
    "ClusterConfig": "clustering",
    "Clusterings": "clustering",
    "cluster_all": "clustering",
    "dbscan_jaccard": "clustering",
    "finch": "clustering",
    "kmeans": "clustering",
    "usl_pseudo_labels": "clustering",
    "RefineResult": "constraints",
    "refine": "constraints",
    "SAMPLERS": "samplers",
    "budget_pairs": "samplers",
    "parse_budget": "samplers",
    "sample_pairs": "samplers",
    "split_budget": "samplers",
    "AnswersReport": "oracle",
    "SimulatedOracle": "oracle",
    "read_answers": "oracle",
    "load_answers": "oracle",
    "normalise_answer": "oracle",
    "write_pseudo_labels": "outputs",
    "write_constraints": "outputs",
    "AnswersNeeded": "runner",
    "EXIT_ANSWERS_NEEDED": "runner",
    "write_pairs_file": "oracle",
    "ALConfig": "config",
    "load_al_config": "config",
    "run_al": "runner",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
