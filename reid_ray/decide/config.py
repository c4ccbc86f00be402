"""How the known-vs-new threshold is chosen: the rule and its targets, the floor of
separability, the sample sizes; and which score decides when re-ranking is on."""

from __future__ import annotations

from dataclasses import dataclass

from reid_ray.config import check, check_choice

RULES = ("balanced", "false_new", "false_known")
# which score decides with re-ranking on: chosen on the simulation, or forced
GATES = ("auto", "global", "fused")
# held-out individuals the decision needs before it trusts them over the training images
# (training holds out at least this many: ``reid_ray.train.rows.calibration_identities``)
MIN_HELDOUT_IDENTITIES = 5


@dataclass(frozen=True)
class DecisionConfig:
    """How the known-vs-new threshold is chosen.

    ``rule``: ``balanced`` (max (BAKS + BAUS) / 2), ``false_new`` (at most ``target`` of
    known samples called new, as few unknowns accepted as that allows) or ``false_known``
    (at most ``target`` of unknown samples accepted, as many knowns accepted as allowed).
    ``min_auroc``: below it the model is flagged as unable to separate known from new.
    ``min_samples``: fewer simulated known or unknown samples than this is flagged
    unreliable (and logged as a warning). ``min_heldout_identities``: held-out individuals
    (with a known sample each) needed before the simulation uses held-out images only.
    ``max_samples``: sample images drawn (seeded) from a larger gallery, to bound memory.
    ``gate``: with re-ranking, which top-1 score decides known vs new: ``auto`` fits the
    threshold on the global cosine and on the calibrated fused probability and keeps the
    fused one only when its simulated hmean(BAKS, BAUS) beats the global one's by
    ``gate_margin`` (re-ranking can find the right animal yet separate known from new
    worse); ``global`` or ``fused`` force one.
    """

    rule: str = "balanced"
    target: float | None = None
    min_auroc: float = 0.6
    min_samples: int = 20
    min_heldout_identities: int = MIN_HELDOUT_IDENTITIES
    max_samples: int = 20_000
    seed: int = 0
    gate: str = "auto"
    gate_margin: float = 0.01

    def __post_init__(self) -> None:
        check_choice("decision rule", self.rule, RULES)
        check_choice("decision gate", self.gate, GATES)
        check(
            0.0 <= self.gate_margin <= 1.0, f"gate_margin must be in [0, 1], got {self.gate_margin}"
        )
        if self.rule == "balanced":
            check(self.target is None, "decision target is only used with rule false_new or "
                  f"false_known, got target={self.target} with rule balanced")  # fmt: skip
        else:
            check(
                self.target is not None and 0.0 <= float(self.target) <= 1.0,
                f"decision rule {self.rule} needs a target rate in [0, 1], got {self.target!r}",
            )
        check(0.0 <= self.min_auroc <= 1.0, f"min_auroc must be in [0, 1], got {self.min_auroc}")
        check(self.min_samples >= 1, f"min_samples must be >= 1, got {self.min_samples}")
        check(self.max_samples >= 2, f"max_samples must be >= 2, got {self.max_samples}")


__all__ = ["GATES", "MIN_HELDOUT_IDENTITIES", "RULES", "DecisionConfig"]
