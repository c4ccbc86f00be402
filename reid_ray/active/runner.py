"""One active-learning run: rounds of embed -> cluster -> sample -> ask -> refine ->
fine-tune -> evaluate, through the other stages' public entry points.

Learns from the ``train`` rows of the split (every row when the manifest has no split)
with their identities hidden: the identity column is dropped from everything the rounds
see; only the simulated oracle (and the scoring of the pseudo-labels, reported, never used)
reads it. A programme's own unlabelled images work the same way with ``oracle: human``:
metrics that need labels (the benchmark protocol on labelled ``query``/``gallery`` rows,
the pseudo-labels' NMI/ARI) are computed when the labels exist and skipped, saying so,
when they do not. Layout of ``OUT``:

- ``al.json``: the run's settings (a rerun with other settings is refused);
- ``start/``: evaluation of the starting model (``evaluate_start``);
- ``rounds/r<k>/``: ``embed/`` (train rows), ``pairs.csv`` + ``pairs.json`` + answers
  (the questions and answers of the round: ``oracle``), ``pseudo.csv`` (the training
  rows), ``pseudo_labels.csv`` (every image), ``train/`` (the fine-tuned model), ``eval/``
  (the benchmark protocol), ``round.json`` written atomically last: a round with it is
  finished and is never redone; it holds the answers of that round only;
- ``pseudo_labels.csv`` + ``constraints.csv`` (the pseudo-labelled manifest for
  ``reid-ray train`` and ``reid-ray gallery build``, ``outputs``), ``metrics.json``,
  ``al.png`` and ``manifest.json`` (last) when every round is done.

A human round waits until every pair is answered (``AnswersNeeded``: the command exits with
``EXIT_ANSWERS_NEEDED`` and one status line; run it again after the next sitting), unless
``accept_partial``: then the pairs left open, and those skipped, spend no budget and may be
asked again later. The budget left over moves on to the next rounds. A killed run, rerun
with the same command, continues after its last finished round (and inside it, embedding
and training resume from their own parts/checkpoints).
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
EXIT_ANSWERS_NEEDED = 3  # `reid-ray al`: a round waits for a person's answers (not a failure)


class AnswersNeeded(ReidRayError):
    """A human-oracle round waits for answers: ``answered`` of ``total`` pairs of
    ``folder`` so far. A normal outcome: the CLI prints ``status`` and exits with
    ``EXIT_ANSWERS_NEEDED``."""

    def __init__(self, round_index: int, answered: int, total: int, folder: str):
        self.round_index, self.answered, self.total, self.folder = (
            round_index, answered, total, folder,
        )  # fmt: skip
        super().__init__(self.status)

    @property
    def status(self) -> str:
        return (
            f"round {self.round_index}: {self.answered} of {self.total} pairs answered; answer "
            f"them (reid-ray al --annotate {self.folder}) and run again when done, or "
            "--accept-partial"
        )


def round_dir(out: str, k: int) -> str:
    return rio.join(out, "rounds", f"r{k}")


def _prepare(cfg: ALConfig, overwrite: bool) -> None:
    from reid_ray.config import to_dict

    record = to_dict(cfg)
    path = rio.join(cfg.out, "al.json")
    if rio.exists(path) and not overwrite:
        prior = rio.read_json(path)
        defaults = to_dict(ALConfig())
        changed = sorted(
            k
            for k in record
            if rio.json_safe(prior.get(k, defaults[k])) != rio.json_safe(record[k])
        )  # fmt: skip - a setting added since the run started reads as its default
        if changed:
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
    """The train rows with identity hidden, and the identities (for the oracle and the
    scoring only). A manifest with no split (no split file, no split values) is all train
    rows: a programme's own images."""
    from reid_ray.data import read_manifest
    from reid_ray.data.manifest import Manifest

    manifest = read_manifest(cfg.manifest, cfg.split)
    if not cfg.split and manifest.table["split"].null_count == manifest.table.num_rows:
        logger.info("%s has no split: every row is a train row", cfg.manifest)
        train = manifest
    else:
        train = manifest.select_splits("train")
    if train.table.num_rows < 3:
        raise ConfigError(
            f"{cfg.split or cfg.manifest} names {train.table.num_rows} train row(s): AL needs "
            "at least 3 (split name: train)"
        )
    identities = dict(
        zip(train.table["image_id"].to_pylist(), train.table["identity"].to_pylist(), strict=True)
    )
    labelled = sum(v is not None for v in identities.values())
    if cfg.oracle == "simulated" and cfg.sampler != "usl" and labelled == 0:
        raise ConfigError(
            f"the simulated oracle answers from the train rows' identities and {cfg.manifest} "
            "has none: use --oracle human (a person answers on the annotation page)"
        )
    table = train.table.set_column(
        train.table.schema.get_field_index("identity"),
        "identity",
        pa.nulls(train.table.num_rows, pa.string()),
    )
    return Manifest(table, manifest.errors, list(manifest.warnings), manifest.source), identities


def evaluation_plan(cfg: ALConfig) -> str | None:
    """None when the rounds can be evaluated (labelled ``query`` and ``gallery`` rows),
    else why not (logged once, recorded in ``metrics.json``)."""
    import pyarrow.compute as pc

    from reid_ray.data import read_manifest

    if not cfg.evaluate:
        return "evaluate: false"
    m = read_manifest(cfg.manifest, cfg.split).labelled()
    have = {
        s: int(pc.sum(pc.equal(m.table["split"], s)).as_py() or 0) for s in ("query", "gallery")
    }
    if not have["query"] or not have["gallery"]:
        return (
            f"no labelled query/gallery rows ({have['query']} query, {have['gallery']} gallery): "
            "retrieval metrics skipped"
        )
    return None


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


def _ask(cfg: ALConfig, rdir: str, k: int, pairs, ids, paths, identities, *, boxes=None,
         accept_partial: bool = False, rerun: str | None = None) -> list[tuple]:  # fmt: skip
    """Ask about ``pairs`` (rows of ``ids``); returns ``(image_id_a, image_id_b, answer)``
    with ``answer`` one of ``oracle.ANSWERS`` or None (left open under ``accept_partial``).
    A human round reads its own pairs file back, so a rerun uses the pairs that were asked,
    and waits (``AnswersNeeded``) until each has an answer."""
    from reid_ray.active.annotate import META_FILE
    from reid_ray.active.oracle import (
        ANSWERS_FILE,
        SimulatedOracle,
        load_answers,
        read_pairs_file,
        write_answers,
        write_pairs_file,
    )

    if cfg.oracle == "simulated":
        oracle = SimulatedOracle([identities[i] for i in ids])
        answers = oracle(pairs)
        write_pairs_file(rdir, pairs, ids, paths, round_index=k, thumbnails=False, boxes=boxes)
        pids = [r["pair_id"] for r in read_pairs_file(rio.join(rdir, "pairs.csv"))]
        write_answers(rio.join(rdir, ANSWERS_FILE), dict(zip(pids, answers, strict=True)))
        return [(ids[a], ids[b], ans) for (a, b), ans in zip(pairs, answers, strict=True)]
    if not rio.exists(rio.join(rdir, "pairs.csv")):
        write_pairs_file(rdir, pairs, ids, paths, round_index=k, boxes=boxes)
        rio.write_json_atomic(
            rio.join(rdir, META_FILE), {"round": k, "pairs": len(pairs), "rerun": rerun}
        )
    rows = read_pairs_file(rio.join(rdir, "pairs.csv"))
    report = load_answers(rdir, rows)
    for line in report.lines():
        logger.log(
            logging.INFO if report.ok else logging.WARNING, "answers of round %d: %s", k, line
        )
    if len(report.answers) < len(rows) and not accept_partial:
        raise AnswersNeeded(k, len(report.answers), len(rows), rdir)
    # open, conflicting or bad rows: listed in the report, spend no budget, may come again
    return [(r["image_id_a"], r["image_id_b"], report.answers.get(r["pair_id"]))
            for r in rows]  # fmt: skip


def _pair_quality(identities: dict, ids, labels: np.ndarray) -> dict | None:
    """The pseudo-labels against the identities the rows have (None without two)."""
    from reid_ray.evaluation import cluster_metrics

    truth = [identities.get(i) for i in ids.tolist()]
    mask = np.array([t is not None for t in truth], dtype=bool)
    if mask.sum() < 2:
        return None
    q = cluster_metrics([t for t in truth if t is not None], labels[mask], noise_label=-1)
    return {**q, "labelled_rows": int(mask.sum())}


def run_round(
    cfg: ALConfig, k: int, train: Any, identities: dict, history: list[dict], progress=None,
    *, accept_partial: bool = False, evaluation: str | None = None, rerun: str | None = None,
) -> dict:  # fmt: skip
    """One round; returns its record (also written to ``round.json``). ``evaluation``:
    why the round is not evaluated (None: it is)."""
    from reid_ray.active.clustering import cluster_all
    from reid_ray.active.constraints import refine
    from reid_ray.active.outputs import (
        answer_counts,
        answers_so_far,
        write_pseudo_labels,
        write_training_rows,
    )
    from reid_ray.active.samplers import Known, budget_pairs, sample_pairs, split_budget
    from reid_ray.embed import EmbedConfig, embed_manifest, read_embeddings
    from reid_ray.evaluation import evaluate
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

    must, cannot, asked = answers_so_far(history)
    # the budget left over (pairs skipped or left open, candidates run out) moves on
    left = max(0, budget_pairs(cfg.budget_value(), len(ids)) - len(asked))
    count = 0 if cfg.sampler == "usl" else split_budget(left, cfg.rounds - k)[0]
    known = Known(len(ids), to_rows(must), to_rows(cannot), to_rows(asked))
    pairs = sample_pairs(cfg.sampler, x, clusterings, count, known=known, seed=cfg.seed * 1000 + k)
    seconds["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    by_id = {r["image_id"]: r for r in train.table.select(["image_id", "path", "bbox"]).to_pylist()}
    new = (
        _ask(cfg, rdir, k, pairs, ids, [by_id[i]["path"] for i in ids], identities,
             boxes=[by_id[i]["bbox"] for i in ids], accept_partial=accept_partial, rerun=rerun)
        if pairs else []
    )  # fmt: skip
    answers = [ans for _, _, ans in new]
    seconds["ask"] = time.perf_counter() - t

    t = time.perf_counter()
    new_must = [[a, b] for a, b, ans in new if ans == "same"]
    new_cannot = [[a, b] for a, b, ans in new if ans == "different"]
    new_asked = [[a, b] for a, b, ans in new if ans in ("same", "different", "unsure")]
    refined = refine(clusterings.dbscan, to_rows(must + new_must), to_rows(cannot + new_cannot),
                     x, merge=cfg.merge)  # fmt: skip
    for c in refined.contradictions:
        logger.warning("round %d: contradiction %s (not enforced)", k, c)
    seconds["refine"] = time.perf_counter() - t

    t = time.perf_counter()
    counts = write_training_rows(
        rio.join(rdir, "pseudo.csv"), train.table, ids, refined.labels, cfg.min_cluster_size
    )
    record_so_far = history + [{"asked": new_asked}]
    write_pseudo_labels(rio.join(rdir, "pseudo_labels.csv"), train.table, ids, refined.labels,
                        cfg.min_cluster_size, answer_counts(record_so_far))  # fmt: skip
    summary = train_model(rio.join(rdir, "pseudo.csv"), rio.join(rdir, "train"),
                          config=cfg.train_config(model), resume=True,
                          progress=progress)  # fmt: skip
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics: dict[str, Any] = {}
    auroc = None
    if evaluation is None:
        metrics = evaluate(
            cfg.manifest, cfg.split, summary["checkpoint"], rio.join(rdir, "eval"), command="al"
        )
        auroc = _auroc(rio.join(rdir, "eval"), _split_of(cfg))
    seconds["evaluate"] = time.perf_counter() - t

    quality = _pair_quality(identities, ids, refined.labels)
    before = _pair_quality(identities, ids, clusterings.dbscan)
    if quality is None:
        logger.info("round %d: the train rows have no identities: pseudo-label quality "
                    "(nmi, ari, pair precision/recall) not computed", k)  # fmt: skip
    q = quality or {}
    record = {
        "round": k,
        "model": model,
        "checkpoint": summary["checkpoint"],
        "sampler": cfg.sampler,
        "pairs_asked": len(new_asked),
        "annotations": len(asked) + len(new_asked),
        "answers": {a: answers.count(a) for a in ("same", "different", "unsure", "skip")},
        "pairs_open": answers.count(None),
        "top1": metrics.get("top1"),
        "top5": metrics.get("top5"),
        "mAP": metrics.get("mAP"),
        "baks": metrics.get("baks"),
        "baus": metrics.get("baus"),
        "auroc": auroc,
        "evaluation": evaluation or "done",
        "nmi": q.get("nmi"),
        "ari": q.get("ari"),
        "pair_precision": q.get("pairwise_precision"),
        "pair_recall": q.get("pairwise_recall"),
        "n_clusters": int(len(set(refined.labels[refined.labels >= 0].tolist()))),
        "labelled_rows": q.get("labelled_rows", 0),
        "before_refine": (
            {k2: before[k2] for k2 in ("nmi", "ari", "pairwise_precision", "pairwise_recall")}
            if before
            else None
        ),
        "refine": refined.summary(),
        "contradictions": refined.contradictions,
        "clusters": {
            name: int(len(set(v[v >= 0].tolist()))) for name, v in clusterings.as_dict().items()
        },
        "noise": int((clusterings.dbscan < 0).sum()),
        "train_rows_embedded": len(ids),
        **counts,
        "seconds": {p: round(seconds[p], 3) for p in PHASES},
        # this round's answers only (earlier rounds hold theirs): each answer stored once
        "must": new_must,
        "cannot": new_cannot,
        "asked": new_asked,
    }
    rio.write_json_atomic(rio.join(rdir, ROUND_FILE), record)
    return record


def _split_of(cfg: ALConfig) -> dict[str, str]:
    from reid_ray.data import read_manifest

    m = read_manifest(cfg.manifest, cfg.split)
    return dict(zip(m.table["image_id"].to_pylist(), m.table["split"].to_pylist(), strict=True))


def _evaluate_start(cfg: ALConfig) -> dict:
    from reid_ray.evaluation import evaluate

    t = time.perf_counter()
    start_out = rio.join(cfg.out, "start")
    done = rio.join(start_out, "metrics.json")
    m = (
        rio.read_json(done)
        if rio.exists(done)
        else evaluate(
            cfg.manifest, cfg.split, cfg.model, start_out, image_size=cfg.image_size, command="al"
        )
    )
    start = {key: m.get(key) for key in ("top1", "top5", "mAP", "baks", "baus")}
    start["auroc"] = _auroc(start_out, _split_of(cfg))
    start["seconds"] = round(time.perf_counter() - t, 3)
    return start


def run_al(cfg: ALConfig, *, overwrite: bool = False, progress: Callable | None = None,
           stop_after: int | None = None, accept_partial: bool = False,
           rerun: str | None = None) -> dict:  # fmt: skip
    """Run (or resume) the AL run ``cfg``; returns ``metrics.json``'s content.
    ``stop_after``: finish that many rounds and return (tests, partial runs);
    ``accept_partial``: a human round goes on with the answers given so far; ``rerun``: the
    command to run again, shown on the annotation page's done screen."""
    from reid_ray.active.outputs import (
        CONSTRAINTS_FILE,
        PSEUDO_FILE,
        answers_so_far,
        write_constraints,
    )
    from reid_ray.active.report import plot_rounds
    from reid_ray.runtime import init_ray, require_shared_output

    if not cfg.manifest or not cfg.out:
        raise ConfigError("an AL run needs manifest and out")
    t0 = time.perf_counter()
    init_ray()
    require_shared_output(cfg.out)
    _prepare(cfg, overwrite)
    train, identities = _hidden_train_rows(cfg)
    evaluation = evaluation_plan(cfg)
    if evaluation:
        logger.info("evaluation skipped: %s", evaluation)
    start = _evaluate_start(cfg) if cfg.evaluate_start and evaluation is None else None
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
        history.append(run_round(cfg, k, train, identities, history, progress,
                                 accept_partial=accept_partial, evaluation=evaluation,
                                 rerun=rerun))  # fmt: skip
        if progress:
            progress(
                {"round": k, **{key: history[-1][key] for key in ("top1", "mAP", "pairs_asked")}}
            )
    # the pseudo-labelled manifest: the last round's refined labels, and every answer
    last_labels = rio.join(round_dir(cfg.out, cfg.rounds - 1), PSEUDO_FILE)
    if rio.exists(last_labels):  # rounds finished by an older version have none
        rio.write_bytes_atomic(rio.join(cfg.out, PSEUDO_FILE), rio.read_bytes(last_labels))
    n_constraints = write_constraints(rio.join(cfg.out, CONSTRAINTS_FILE), history)
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
        "oracle": cfg.oracle,
        "budget": cfg.budget,
        "budget_pairs": len(answers_so_far(history)[2]),
        "start": start,
        "evaluation": evaluation or "done",
        "rounds": public,
        "rounds_resumed": resumed,
        "checkpoint": last["checkpoint"],
        "pseudo_labels": rio.join(cfg.out, PSEUDO_FILE),
        "constraints": rio.join(cfg.out, CONSTRAINTS_FILE),
        "pseudo_identities": _count_identities(rio.join(cfg.out, PSEUDO_FILE))
        if rio.exists(last_labels)
        else None,
        "answers_kept": n_constraints,
        "seconds_by_phase": {p: round(sum(h["seconds"][p] for h in public), 3) for p in PHASES},
        "total_seconds": round(time.perf_counter() - t0, 3),
        "measure": "per round: top1/mAP/baks/baus from the benchmark protocol on query/gallery/"
        "query_unknown (reid_ray.evaluation.evaluate) with the round's fine-tuned model, when "
        "those rows are labelled (else None, see evaluation); auroc: top-1 similarity "
        "separating query (known) from query_unknown rows; nmi/ari/pair_*: refined "
        "pseudo-labels of the train rows against their identities where they have them "
        "(noise = singletons; None without)",
    }
    rio.write_json_atomic(rio.join(cfg.out, "metrics.json"), metrics)
    try:
        plot_rounds(metrics, rio.join(cfg.out, "al.png"))
    except Exception:  # noqa: BLE001 - a missing plot must not fail a finished run
        logger.exception("could not draw the AL plot")
    from reid_ray.parts import write_run_record

    write_run_record(cfg.out, "al", config=cfg, counts={"rounds": len(public)},
                     timings={"total_s": metrics["total_seconds"]},
                     outputs={"metrics": "metrics.json", "plot": "al.png",
                              "pseudo_labels": PSEUDO_FILE,
                              "constraints": CONSTRAINTS_FILE})  # fmt: skip
    return metrics


def _count_identities(path: str) -> int:
    import io

    import pandas as pd

    return int(pd.read_csv(io.BytesIO(rio.read_bytes(path)))["identity"].nunique())


__all__ = ["EXIT_ANSWERS_NEEDED", "AnswersNeeded", "PHASES", "evaluation_plan", "run_al",
           "run_round"]  # fmt: skip
