"""BAKS and BAUS against the threshold: the picture of a known-vs-new decision."""

from __future__ import annotations

import io

import numpy as np

from reid_ray import io as rio
from reid_ray.decide.fit import Decision


def plot_decision(
    decision: Decision,
    path: str,
    *,
    observed: dict[str, np.ndarray] | None = None,
    title: str = "known vs new: accuracy against the threshold",
) -> str | None:
    """BAKS and BAUS against the threshold (PNG at ``path``, local or s3://): the simulated
    curves the threshold was chosen on and, when given, ``observed`` (a
    :func:`~reid_ray.decide.rule.balanced_threshold_curve` of the real queries,
    evaluation only). Returns the path, or None when there is no curve to draw."""
    if not decision.curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for curve, style, label in ((decision.curve, "-", "simulated"), (observed, "--", "queries")):
        if not curve:
            continue
        # a threshold in (values[j-1], values[j]] accepts what cut j accepts: steps "pre",
        # plus the cut above the highest score (nothing accepted)
        v = curve["values"]
        x = np.append(v, v[-1] + 0.02 * max(float(v[-1] - v[0]), 1e-6))
        ax.step(x, curve["baks"], style, where="pre", color="tab:blue",
                label=f"BAKS ({label})")  # fmt: skip
        ax.step(x, curve["baus"], style, where="pre", color="tab:orange",
                label=f"BAUS ({label})")  # fmt: skip
    if np.isfinite(decision.threshold):
        ax.axvline(
            decision.threshold, color="grey", lw=1, label=f"threshold {decision.threshold:.3g}"
        )
    ax.set_xlabel(decision.score)
    ax.set_ylabel("balanced accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}\nsimulated AUROC {decision.auroc:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    rio.write_bytes_atomic(path, buf.getvalue())
    return path


__all__ = ["plot_decision"]
