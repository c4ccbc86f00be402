"""Which pairs to ask about: budgets and the samplers.

- ``random``: pairs drawn uniformly from all N(N-1)/2 pairs (the plain baseline). Almost
  all are plainly different animals (about 8 "same" in 505 on the toy zoo, 2 in 1,718
  on the dogs), so their answers barely move the pseudo-labels;
- ``random_knn``: pairs drawn uniformly from the candidate pairs, the k-NN graph's edges
  that ``margin`` and ``aas`` choose from too, so the three differ only in how they choose
  (a stronger baseline than ``random``);
- ``margin``: k-NN pairs whose similarity is nearest the same/different threshold (the
  most uncertain pairs by similarity margin);
- ``aas``: ambiguity-aware: k-NN pairs on which the complementary clusterings disagree,
  scored for uncertainty (vote entropy plus closeness to the threshold), then chosen to be
  representative: greedy k-center over the pairs' midpoints weighted by their score, and at
  most one pair per disagreement region until every region has one.

Pairs whose answer the constraints already imply (same must-link group; groups already
cannot-linked) or that were asked before are never asked again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from reid_ray.active.clustering import NOISE, Clusterings
from reid_ray.active.graph import KnnGraph, l2_normalise
from reid_ray.errors import ConfigError

SAMPLERS = ("usl", "random", "random_knn", "margin", "aas")
DEFAULT_BUDGET = 0.00033  # 0.033% of all pairs, the AAS paper's smallest budget


def parse_budget(text: str | float | int) -> float | int:
    """``"0.033%"`` or ``0.00033`` (a fraction of all pairs, < 1) or ``"200"`` (pairs)."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100.0
            is_fraction = True
        elif re.fullmatch(r"\d+", raw):
            value, is_fraction = int(raw), False
        else:
            value = float(raw)
            is_fraction = value < 1
    except ValueError:
        raise ConfigError(
            f"budget {text!r}: use a fraction of all pairs (0.00033 or 0.033%) or a count (200)"
        ) from None
    if not math.isfinite(value) or value < 0 or (is_fraction and value > 1):
        raise ConfigError(f"budget {text!r} must be a count >= 0 or a fraction in [0, 1]")
    if not is_fraction and value != int(value):
        raise ConfigError(f"budget {text!r}: a count of pairs must be a whole number")
    return float(value) if is_fraction else int(value)


def budget_pairs(budget: float | int, n_items: int) -> int:
    """Total pairs to ask: a count as given, a fraction of N(N-1)/2 rounded (at least 1
    when the fraction is positive)."""
    if isinstance(budget, int):
        return budget
    total = n_items * (n_items - 1) // 2
    return max(1, int(round(budget * total))) if budget > 0 else 0


def split_budget(total: int, rounds: int) -> list[int]:
    """``total`` pairs over ``rounds``: equal shares, the remainder to the first rounds."""
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    base, extra = divmod(int(total), rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


class Known:
    """Pairs asked before and what the answers imply (must-link groups, cannot-linked
    groups), so samplers never spend budget on an answer already known."""

    def __init__(self, n: int, must: Iterable = (), cannot: Iterable = (), asked: Iterable = ()):
        from reid_ray.active.constraints import UnionFind

        self.uf = UnionFind(n)
        for a, b in must:
            self.uf.union(int(a), int(b))
        self.cannot = {self._key(self.uf.find(int(a)), self.uf.find(int(b))) for a, b in cannot}
        self.asked = {self._key(int(a), int(b)) for a, b in asked}

    @staticmethod
    def _key(a: int, b: int) -> tuple[int, int]:
        return (a, b) if a < b else (b, a)

    def implied(self, a: int, b: int) -> bool:
        ra, rb = self.uf.find(a), self.uf.find(b)
        return ra == rb or self._key(ra, rb) in self.cannot or self._key(a, b) in self.asked


def threshold(graph: KnnGraph, labels: np.ndarray) -> float:
    """The same/different similarity threshold the pseudo-labels imply: midway between the
    mean similarity of k-NN edges inside a cluster and of those across clusters."""
    a, b, s = graph.edges()
    same = (labels[a] == labels[b]) & (labels[a] != NOISE)
    if same.any() and (~same).any():
        return float((s[same].mean() + s[~same].mean()) / 2)
    return float(np.median(s)) if len(s) else 0.5


def _first_new(a: np.ndarray, b: np.ndarray, order, count: int, known: Known) -> list:
    """The first ``count`` pairs ``(a[k], b[k])`` in ``order`` whose answer is not known
    (fewer when the candidates run out)."""
    chosen = []
    for k in order:
        if len(chosen) == count:
            break
        if not known.implied(int(a[k]), int(b[k])):
            chosen.append((int(a[k]), int(b[k])))
    return chosen


def knn_random_pairs(graph: KnnGraph, count: int, rng: np.random.Generator, known: Known) -> list:
    """``count`` k-NN pairs drawn uniformly (without replacement), none already known."""
    a, b, _ = graph.edges()
    return _first_new(a, b, rng.permutation(len(a)).tolist(), count, known)


def random_pairs(n: int, count: int, rng: np.random.Generator, known: Known) -> list:
    """``count`` distinct pairs drawn uniformly from all pairs, none already known."""
    chosen: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    limit = n * (n - 1) // 2
    tries = 0
    while len(chosen) < count and tries < 50 * count + 1000 and len(seen) < limit:
        tries += 1
        a, b = (int(v) for v in rng.choice(n, 2, replace=False))
        key = (min(a, b), max(a, b))
        if key in seen:
            continue
        seen.add(key)
        if not known.implied(*key):
            chosen.append(key)
    return chosen


def margin_pairs(graph: KnnGraph, labels: np.ndarray, count: int, known: Known) -> list:
    """The k-NN pairs with the smallest |similarity - threshold|."""
    a, b, s = graph.edges()
    tau = threshold(graph, labels)
    order = np.argsort(np.abs(s - tau), kind="stable")
    return _first_new(a, b, order.tolist(), count, known)


def disagreement(clusterings: Clusterings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """k-NN edges and, per edge, the fraction of clusterings that put both ends together
    (noise never joins anything). Returns ``(a, b, sim, votes)``."""
    a, b, s = clusterings.graph.edges()
    labelings = list(clusterings.as_dict().values())
    votes = np.zeros(len(a))
    for lab in labelings:
        votes += (lab[a] == lab[b]) & (lab[a] != NOISE)
    return a, b, s, votes / len(labelings)


def aas_pairs(features: np.ndarray, clusterings: Clusterings, count: int, known: Known) -> list:
    """Ambiguity-aware pairs: disputed, uncertain, and spread over the space."""
    a, b, s, p = disagreement(clusterings)
    tau = threshold(clusterings.graph, clusterings.dbscan)
    keep = np.array(
        [not known.implied(int(x), int(y)) for x, y in zip(a, b, strict=True)], dtype=bool
    )
    disputed = keep & (p > 0) & (p < 1)
    if disputed.sum() < count:  # too few disputes: fall back to the uncertain agreed pairs
        disputed = keep
    a, b, s, p = a[disputed], b[disputed], s[disputed], p[disputed]
    if len(a) == 0 or count <= 0:
        return []
    entropy = -(p * np.log2(np.clip(p, 1e-9, 1)) + (1 - p) * np.log2(np.clip(1 - p, 1e-9, 1)))
    spread = max(float(np.std(s)), 1e-6)
    closeness = np.exp(-(((s - tau) / spread) ** 2))
    score = 0.5 * entropy + 0.5 * closeness + 1e-6
    # disagreement regions: connected components of the disputed edges
    n = len(features)
    adj = sparse.csr_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, region_of = connected_components(adj, directed=False)
    region = region_of[a]
    x = l2_normalise(features)
    mid = l2_normalise(x[a] + x[b])
    chosen: list[int] = []
    covered: set[int] = set()
    min_dist = np.full(len(a), np.inf)
    n_regions = len(np.unique(region))
    while len(chosen) < min(count, len(a)):
        gain = score * np.where(np.isfinite(min_dist), min_dist, 2.0)
        if len(covered) < n_regions:  # first one pair per region
            gain = np.where(np.isin(region, list(covered)), -np.inf, gain)
        gain[chosen] = -np.inf
        k = int(np.argmax(gain))
        if not np.isfinite(gain[k]):
            break
        chosen.append(k)
        covered.add(int(region[k]))
        min_dist = np.minimum(min_dist, 1.0 - mid @ mid[k])
    return [(int(a[k]), int(b[k])) for k in chosen]


def sample_pairs(
    name: str,
    features: np.ndarray,
    clusterings: Clusterings,
    count: int,
    *,
    known: Known,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """``count`` new pairs (i < j) to ask, by sampler ``name``."""
    if name not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    if name == "usl" or count <= 0:
        return []
    if name == "random":
        return random_pairs(len(features), count, np.random.default_rng(seed), known)
    if name == "random_knn":
        return knn_random_pairs(clusterings.graph, count, np.random.default_rng(seed), known)
    if name == "margin":
        return margin_pairs(clusterings.graph, clusterings.dbscan, count, known)
    return aas_pairs(features, clusterings, count, known)


__all__ = [
    "DEFAULT_BUDGET",
    "SAMPLERS",
    "Known",
    "aas_pairs",
    "budget_pairs",
    "disagreement",
    "knn_random_pairs",
    "margin_pairs",
    "parse_budget",
    "random_pairs",
    "sample_pairs",
    "split_budget",
    "threshold",
]
