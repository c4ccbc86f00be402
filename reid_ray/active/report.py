"""What an AL run shows: a plot of mAP and pseudo-label quality per round, and the same
figures as a table on the terminal."""

from __future__ import annotations

from typing import Any

from reid_ray import io as rio

TABLE_HEADER = [
    "round", "answers", "top1", "mAP", "baks", "baus", "auroc", "nmi", "ari", "pair P", "pair R",
    "seconds",
]  # fmt: skip


def table_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """One row per round (the starting model first when it was evaluated)."""
    rows: list[list[Any]] = []
    start = metrics.get("start")
    if start:
        rows.append(["start", 0, start.get("top1"), start.get("mAP"), start.get("baks"),
                     start.get("baus"), start.get("auroc"), "-", "-", "-", "-",
                     start.get("seconds")])  # fmt: skip
    for r in metrics.get("rounds", []):
        rows.append([
            r["round"], r["annotations"], r.get("top1"), r.get("mAP"), r.get("baks"),
            r.get("baus"), r.get("auroc"), r.get("nmi"), r.get("ari"), r.get("pair_precision"),
            r.get("pair_recall"), round(sum(r["seconds"].values()), 1),
        ])  # fmt: skip
    return [["-" if v is None else v for v in row] for row in rows]


def print_table(metrics: dict[str, Any], title: str | None = None) -> None:
    from reid_ray.console import metrics_table

    title = (
        title
        or f"active learning: sampler {metrics.get('sampler')}, budget {metrics.get('budget')}"
    )
    metrics_table(title, TABLE_HEADER, table_rows(metrics))


def plot_rounds(metrics: dict[str, Any], path: str) -> None:
    """Two panels: mAP/top-1 per round (the start model at round -1), and the pseudo-labels'
    NMI, ARI, pairwise precision and recall per round. PNG at ``path``."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = metrics.get("rounds", [])
    xs = [r["round"] for r in rounds]
    nan = float("nan")  # a figure not measured (no labels) is a gap, not a zero
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("mAP", "o-"), ("top1", "s--")):
        ys = [nan if r.get(key) is None else r.get(key) for r in rounds]
        start = (metrics.get("start") or {}).get(key)
        if start is not None:
            a.plot([-1] + xs, [start] + ys, style, label=key)
        else:
            a.plot(xs, ys, style, label=key)
    a.set_xlabel("round (-1: starting model)")
    a.set_title(f"retrieval, sampler {metrics.get('sampler')}")
    a.set_ylim(0, 1)
    a.legend()
    for key in ("nmi", "ari", "pair_precision", "pair_recall"):
        b.plot(xs, [nan if r.get(key) is None else r.get(key) for r in rounds], "o-", label=key)
    b.set_xlabel("round")
    b.set_title("pseudo-label quality (train rows)")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    rio.write_bytes_atomic(path, buf.getvalue())


__all__ = ["plot_rounds", "print_table", "table_rows"]
