"""Monotone score -> probability calibrators, stored as plain numbers: the one calibrator
type of reid-ray (re-ranking's fusion calibrates each score and the fused one with it; the
gallery turns cosines into the confidence reviewers see with it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from reid_ray.errors import ConfigError

KINDS = ("isotonic", "logistic")


TRANSFORMS = ("identity", "log1p")


@dataclass(frozen=True)
class Calibrator:
    """A monotone map from a score to a probability, fitted by scikit-learn and stored as
    numbers: ``isotonic`` (the fitted thresholds, interpolated linearly and clipped at the
    ends, exactly as ``IsotonicRegression.predict`` with ``out_of_bounds="clip"``) or
    ``logistic`` (``sigmoid(a * x + b)``), after an optional ``log1p`` of the score."""

    kind: str
    transform: str = "identity"
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    a: float = 0.0
    b: float = 0.0

    def _t(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        return np.log1p(np.maximum(v, 0.0)) if self.transform == "log1p" else v

    def predict(self, values: np.ndarray) -> np.ndarray:
        v = self._t(values)
        if self.kind == "isotonic":
            return np.interp(v, np.asarray(self.x), np.asarray(self.y))
        z = np.clip(self.a * v + self.b, -50.0, 50.0)
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "transform": self.transform,
            "x": list(self.x),
            "y": list(self.y),
            "a": self.a,
            "b": self.b,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        try:
            cal = cls(
                str(d["kind"]),
                str(d.get("transform", "identity")),
                tuple(float(v) for v in d.get("x", ())),
                tuple(float(v) for v in d.get("y", ())),
                float(d.get("a", 0.0)),
                float(d.get("b", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad calibrator in fusion model: {exc}") from None
        if cal.kind not in KINDS or cal.transform not in TRANSFORMS:
            raise ConfigError(
                f"bad calibrator in fusion model: kind {cal.kind!r}, transform {cal.transform!r}"
            )
        if cal.kind == "isotonic" and (len(cal.x) == 0 or len(cal.x) != len(cal.y)):
            raise ConfigError("bad isotonic calibrator in fusion model: no fitted points")
        return cal


def fit_calibrator(
    values: np.ndarray,
    labels: np.ndarray,
    kind: str,
    transform: str = "identity",
    *,
    balanced: bool = False,
) -> Calibrator:
    """Fit a non-decreasing calibrator of ``values`` to the 0/1 ``labels`` (scikit-learn).

    ``balanced`` (logistic only): both classes weigh the same, so 0.5 sits where "same"
    and "other" are equally likely under equal priors, whatever their counts in the fit."""
    if kind not in KINDS:
        raise ConfigError(f"calibration must be one of {', '.join(KINDS)}, got {kind!r}")
    x = Calibrator(kind, transform)._t(values)
    y = np.asarray(labels, dtype=np.float64)
    if x.size == 0:
        raise ConfigError("cannot calibrate on zero pairs")
    if kind == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(x, y)
        return Calibrator(
            kind,
            transform,
            tuple(map(float, iso.X_thresholds_)),
            tuple(map(float, iso.y_thresholds_)),
        )
    rate = 0.5 if balanced else float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    mu, sd = float(x.mean()), float(x.std())
    if sd == 0 or y.min() == y.max():  # nothing to regress on: the base rate
        return Calibrator(kind, transform, a=0.0, b=float(np.log(rate / (1 - rate))))
    from sklearn.linear_model import LogisticRegression

    # C=1 on the standardised score: a small L2 penalty keeps separable data finite
    lr = LogisticRegression(C=1.0, class_weight="balanced" if balanced else None)
    lr.fit(((x - mu) / sd)[:, None], y.astype(int))
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return Calibrator(kind, transform, a=a / sd, b=b - a * mu / sd)


__all__ = ["KINDS", "TRANSFORMS", "Calibrator", "fit_calibrator"]
