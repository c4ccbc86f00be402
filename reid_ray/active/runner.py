"""One active-learning run: rounds of embed -> cluster -> sample -> ask -> refine ->
fine-tune -> evaluate, through the other stages' public entry points.

Learns from the ``train`` rows of the split with their identities hidden: the identity
column is dropped from everything the rounds see; only the oracle (and the scoring of the
pseudo-labels, reported, never used) reads it. Layout of ``OUT``:

- ``al.json``: the run's settings (a rerun with other settings is refused);
- ``start/``: evaluation of the starting model (``evaluate_start``);
- ``rounds/r<k>/``: ``embed/`` (train rows), ``pairs.csv`` + ``answers.csv`` (the
  questions and answers of the round), ``pseudo.csv`` (the pseudo-labelled manifest),
  ``train/`` (the fine-tuned model), ``eval/`` (the benchmark protocol), ``round.json``
  written atomically last: a round with it is finished and is never redone;
- ``metrics.json``, ``al.png`` and ``manifest.json`` (last) when every round is done.

A killed run, rerun with the same command, continues after its last finished round (and
inside it, embedding and training resume from their own parts/checkpoints).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from reid_ray import io as rio
from reid_ray.active.config import ALConfig
from reid_ray.errors import ConfigError, ReidRayError

logger = logging.getLogger(__name__)

ROUND_FILE = "round.json"
PHASES = ("embed", "cluster", "sample", "ask", "refine", "train", "evaluate")


class AnswersNeeded(ReidRayError):
    """A human-oracle round wrote its pairs file and waits for the answers."""


def round_dir(out: str, k: int) -> str:
    return rio.join(out, "rounds", f"r{k}")


def _prepare(cfg: ALConfig, overwrite: bool) -> None:
    from reid_ray.config import to_dict

    record = to_dict(cfg)
    path = rio.join(cfg.out, "al.json")
    if rio.exists(path) and not overwrite:
        prior = rio.read_json(path)
        if rio.json_safe(prior) != rio.json_safe(record):
            changed = sorted(
                k for k in record if rio.json_safe(prior.get(k)) != rio.json_safe(record[k])
            )
            raise ConfigError(
                f"{cfg.out} holds an AL run with other settings ({', '.join(changed)}): "
                "use another --out or --overwrite"
            )
    if overwrite:
        rio.remove(rio.join(cfg.out, "rounds"), recursive=True)
        rio.remove(rio.join(cfg.out, "start"), recursive=True)
    rio.makedirs(cfg.out)
    rio.write_json_atomic(path, record)
    rio.remove(rio.join(cfg.out, "manifest.json"))  # in progress: not complete


def _hidden_train_rows(cfg: ALConfig):
    """The train rows with identity hidden, and the identities (for the oracle only)."""
    from reid_ray.data import read_manifest
    from reid_ray.data.manifest import Manifest

    manifest = read_manifest(cfg.manifest, cfg.split)
    train = manifest.select_splits("train")
    if train.table.num_rows < 3:
        raise ConfigError(
            f"{cfg.split or cfg.manifest} names {train.table.num_rows} train row(s): AL needs "
            "at least 3 (split name: train)"
        )
    identities = dict(
        zip(train.table["image_id"].to_pylist(), train.table["identity"].to_pylist(), strict=True)
    )
    table = train.table.set_column(
        train.table.schema.get_field_index("identity"),
        "identity",
        pa.nulls(train.table.num_rows, pa.string()),
    )
    return Manifest(table, manifest.errors, list(manifest.warnings), manifest.source), identities


def _pseudo_manifest(
    path: str, table: pa.Table, ids: np.ndarray, labels: np.ndarray, min_size: int
) -> dict:
    """Write the pseudo-labelled manifest (``train`` rows of clusters >= ``min_size``)."""
    import pandas as pd

    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, int)
    keep = (labels >= 0) & (sizes[np.clip(labels, 0, None)] >= min_size if len(sizes) else False)
    row_of = {i: n for n, i in enumerate(table["image_id"].to_pylist())}
    rows = [row_of[i] for i in ids[keep].tolist()]
    sub = table.take(pa.array(rows, pa.int64())) if rows else table.slice(0, 0)
    df = pd.DataFrame({
        "image_id": sub["image_id"].to_pylist(),
        "path": sub["path"].to_pylist(),
        "identity": [f"p{int(v)}" for v in labels[keep]],
        "split": "train",
    })  # fmt: skip
    bbox = sub["bbox"].to_pylist()
    if any(b is not None for b in bbox):
        df["bbox"] = ["" if b is None else "[" + ", ".join(f"{v:g}" for v in b) + "]" for b in bbox]
    rio.write_bytes_atomic(path, df.to_csv(index=False).encode())
    return {
        "pseudo_images": int(keep.sum()),
        "pseudo_identities": int(len(set(labels[keep].tolist()))),
    }


def _auroc(eval_out: str, split_of: dict[str, str]) -> float | None:
    """Known-vs-unknown AUROC of the top-1 similarity (threshold-free): ``query`` rows are
    known individuals, ``query_unknown`` rows unknown ones."""
    from sklearn.metrics import roc_auc_score

    from reid_ray.index import read_candidates

    cand = read_candidates(rio.join(eval_out, "candidates")).to_pandas()
    top = cand.groupby("query_id")["score"].max()
    qids, scores = top.index.tolist(), top.to_numpy(dtype=float)
    y = [1 if split_of.get(q) == "query" else 0 for q in qids]
    if len(set(y)) < 2:
        return None
    return float(roc_auc_score(y, scores))


def _ask(cfg: ALConfig, rdir: str, k: int, pairs, ids, paths, identities) -> list[tuple]:
    """Ask about ``pairs`` (rows of ``ids``); returns ``(image_id_a, image_id_b, answer)``.
    A human round reads its own pairs file back, so a rerun uses the pairs that were asked."""
    from reid_ray.active.oracle import (
        SimulatedOracle,
        read_answers,
        read_pairs_file,
        write_answers,
        write_pairs_file,
    )

    answers_path = rio.join(rdir, "answers.csv")
    if cfg.oracle == "simulated":
        oracle = SimulatedOracle([identities[i] for i in ids])
        answers = oracle(pairs)
        write_pairs_file(rdir, pairs, ids, paths, round_index=k, thumbnails=False)
        pids = [r["pair_id"] for r in read_pairs_file(rio.join(rdir, "pairs.csv"))]
        write_answers(answers_path, dict(zip(pids, answers, strict=True)))
        return [(ids[a], ids[b], ans) for (a, b), ans in zip(pairs, answers, strict=True)]
    if not rio.exists(rio.join(rdir, "pairs.csv")):
        write_pairs_file(rdir, pairs, ids, paths, round_index=k)
    rows = read_pairs_file(rio.join(rdir, "pairs.csv"))
    if not rio.exists(answers_path):
        raise AnswersNeeded(
            f"round {k}: answer the {len(rows)} pairs of {rdir}/pairs.csv into {answers_path} "
            f"(reid-ray al --annotate {rdir}), then rerun the same command"
        )
    report = read_answers(answers_path, rows)
    for line in report.lines():
        logger.log(
            logging.INFO if report.ok else logging.WARNING, "answers of round %d: %s", k, line
        )
    # unanswered, conflicting or bad rows count as unsure: listed in the report, never used
    return [(r["image_id_a"], r["image_id_b"], report.answers.get(r["pair_id"], "unsure"))
            for r in rows]  # fmt: skip


def run_round(
    cfg: ALConfig, k: int, train: Any, identities: dict, history: list[dict], progress=None
) -> dict:
    """One round; returns its record (also written to ``round.json``)."""
    from reid_ray.active.clustering import cluster_all
    from reid_ray.active.constraints import refine
    from reid_ray.active.samplers import Known, budget_pairs, sample_pairs, split_budget
    from reid_ray.embed import EmbedConfig, embed_manifest, read_embeddings
    from reid_ray.evaluation import cluster_metrics, evaluate
    from reid_ray.train import train as train_model

    rdir = round_dir(cfg.out, k)
    seconds: dict[str, float] = {}
    model = cfg.model if k == 0 else history[-1]["checkpoint"]
    size = cfg.image_size if k == 0 else None
    t = time.perf_counter()
    embed_manifest(
        train, model, rio.join(rdir, "embed"), EmbedConfig(image_size=size), command="al"
    )
    emb = read_embeddings(rio.join(rdir, "embed"))
    ids, x = emb.ids.astype(str), emb.matrix
    seconds["embed"] = time.perf_counter() - t

    t = time.perf_counter()
    clusterings = cluster_all(x, cfg.cluster)
    seconds["cluster"] = time.perf_counter() - t

    t = time.perf_counter()
    row = {i: n for n, i in enumerate(ids.tolist())}

    def to_rows(pairs):  # noqa: E306 - image ids of earlier rounds -> rows of this embedding
        return [(row[a], row[b]) for a, b in pairs if a in row and b in row]

    must = [p for h in history for p in h["must"]]
    cannot = [p for h in history for p in h["cannot"]]
    asked = [p for h in history for p in h["asked"]]
    per_round = split_budget(budget_pairs(cfg.budget_value(), len(ids)), cfg.rounds)
    count = 0 if cfg.sampler == "usl" else per_round[k]
    known = Known(len(ids), to_rows(must), to_rows(cannot), to_rows(asked))
    pairs = sample_pairs(cfg.sampler, x, clusterings, count, known=known, seed=cfg.seed * 1000 + k)
    seconds["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    paths = dict(
        zip(train.table["image_id"].to_pylist(), train.table["path"].to_pylist(), strict=True)
    )
    new = _ask(cfg, rdir, k, pairs, ids, [paths[i] for i in ids], identities) if pairs else []
    answers = [ans for _, _, ans in new]
    seconds["ask"] = time.perf_counter() - t

    t = time.perf_counter()
    must += [[a, b] for a, b, ans in new if ans == "same"]
    cannot += [[a, b] for a, b, ans in new if ans == "different"]
    refined = refine(clusterings.dbscan, to_rows(must), to_rows(cannot), x, merge=cfg.merge)
    for c in refined.contradictions:
        logger.warning("round %d: contradiction %s (not enforced)", k, c)
    seconds["refine"] = time.perf_counter() - t

    t = time.perf_counter()
    pseudo = rio.join(rdir, "pseudo.csv")
    counts = _pseudo_manifest(pseudo, train.table, ids, refined.labels, cfg.min_cluster_size)
    summary = train_model(pseudo, rio.join(rdir, "train"), config=cfg.train_config(model), resume=True,
                          progress=progress)  # fmt: skip
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = evaluate(
        cfg.manifest, cfg.split, summary["checkpoint"], rio.join(rdir, "eval"), command="al"
    )
    seconds["evaluate"] = time.perf_counter() - t

    truth = [identities[i] for i in ids]
    quality = cluster_metrics(truth, refined.labels, noise_label=-1)
    before = cluster_metrics(truth, clusterings.dbscan, noise_label=-1)
    record = {
        "round": k,
        "model": model,
        "checkpoint": summary["checkpoint"],
        "sampler": cfg.sampler,
        "pairs_asked": len(new),
        "annotations": len(asked) + len(new),
        "answers": {a: answers.count(a) for a in ("same", "different", "unsure")},
        "top1": metrics.get("top1"),
        "top5": metrics.get("top5"),
        "mAP": metrics.get("mAP"),
        "baks": metrics.get("baks"),
        "baus": metrics.get("baus"),
        "auroc": _auroc(rio.join(rdir, "eval"), _split_of(cfg)),
        "nmi": quality["nmi"],
        "ari": quality["ari"],
        "pair_precision": quality["pairwise_precision"],
        "pair_recall": quality["pairwise_recall"],
        "n_clusters": quality["n_clusters"],
        "before_refine": {
            k2: before[k2] for k2 in ("nmi", "ari", "pairwise_precision", "pairwise_recall")
        },
        "refine": refined.summary(),
        "contradictions": refined.contradictions,
        "clusters": {
            name: int(len(set(v[v >= 0].tolist()))) for name, v in clusterings.as_dict().items()
        },
        "noise": int((clusterings.dbscan < 0).sum()),
        "train_rows_embedded": len(ids),
        **counts,
        "seconds": {p: round(seconds[p], 3) for p in PHASES},
        "must": must,
        "cannot": cannot,
        "asked": asked + [[a, b] for a, b, _ in new],
    }
    rio.write_json_atomic(rio.join(rdir, ROUND_FILE), record)
    return record


def _split_of(cfg: ALConfig) -> dict[str, str]:
    from reid_ray.data import read_manifest

    m = read_manifest(cfg.manifest, cfg.split)
    return dict(zip(m.table["image_id"].to_pylist(), m.table["split"].to_pylist(), strict=True))


def run_al(cfg: ALConfig, *, overwrite: bool = False, progress: Callable | None = None,
           stop_after: int | None = None) -> dict:  # fmt: skip
    """Run (or resume) the AL run ``cfg``; returns ``metrics.json``'s content.
    ``stop_after``: finish that many rounds and return (tests, partial runs)."""
    from reid_ray.active.report import plot_rounds
    from reid_ray.evaluation import evaluate
    from reid_ray.runtime import init_ray, require_shared_output

    if not cfg.manifest or not cfg.out:
        raise ConfigError("an AL run needs manifest and out")
    t0 = time.perf_counter()
    init_ray()
    require_shared_output(cfg.out)
    _prepare(cfg, overwrite)
    train, identities = _hidden_train_rows(cfg)
    start = None
    if cfg.evaluate_start:
        t = time.perf_counter()
        start_out = rio.join(cfg.out, "start")
        done = rio.join(start_out, "metrics.json")
        m = (
            rio.read_json(done)
            if rio.exists(done)
            else evaluate(
                cfg.manifest,
                cfg.split,
                cfg.model,
                start_out,
                image_size=cfg.image_size,
                command="al",
            )
        )
        start = {key: m.get(key) for key in ("top1", "top5", "mAP", "baks", "baus")}
        start["auroc"] = _auroc(start_out, _split_of(cfg))
        start["seconds"] = round(time.perf_counter() - t, 3)
    history: list[dict] = []
    resumed = 0
    for k in range(cfg.rounds):
        if stop_after is not None and k >= stop_after:
            return {"rounds": history, "stopped_after": k}
        path = rio.join(round_dir(cfg.out, k), ROUND_FILE)
        if rio.exists(path):
            history.append(rio.read_json(path))
            resumed += 1
            logger.info("round %d already finished: reused", k)
            continue
        logger.info("AL round %d/%d (%s)", k + 1, cfg.rounds, cfg.sampler)
        history.append(run_round(cfg, k, train, identities, history, progress))
        if progress:
            progress(
                {"round": k, **{key: history[-1][key] for key in ("top1", "mAP", "pairs_asked")}}
            )
    public = [
        {key: v for key, v in h.items() if key not in ("must", "cannot", "asked")} for h in history
    ]
    last = public[-1]
    metrics = {
        "command": "al",
        **{
            key: last.get(key)
            for key in ("top1", "top5", "mAP", "baks", "baus", "auroc", "nmi", "ari")
        },
        "sampler": cfg.sampler,
        "budget": cfg.budget,
        "budget_pairs": sum(h["pairs_asked"] for h in public),
        "start": start,
        "rounds": public,
        "rounds_resumed": resumed,
        "seconds_by_phase": {p: round(sum(h["seconds"][p] for h in public), 3) for p in PHASES},
        "total_seconds": round(time.perf_counter() - t0, 3),
        "measure": "per round: top1/mAP/baks/baus from the benchmark protocol on query/gallery/"
        "query_unknown (reid_ray.evaluation.evaluate) with the round's fine-tuned model; auroc: "
        "top-1 similarity separating query (known) from query_unknown rows; nmi/ari/pair_*: "
        "refined pseudo-labels of the train rows against the hidden identities (noise = singletons)",
    }
    rio.write_json_atomic(rio.join(cfg.out, "metrics.json"), metrics)
    try:
        plot_rounds(metrics, rio.join(cfg.out, "al.png"))
    except Exception:  # noqa: BLE001 - a missing plot must not fail a finished run
        logger.exception("could not draw the AL plot")
    from reid_ray.parts import write_run_record

    write_run_record(cfg.out, "al", config=cfg, counts={"rounds": len(public)},
                     timings={"total_s": metrics["total_seconds"]},
                     outputs={"metrics": "metrics.json", "plot": "al.png"})  # fmt: skip
    return metrics


__all__ = ["AnswersNeeded", "PHASES", "run_al", "run_round"]
