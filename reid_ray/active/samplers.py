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

Budgets are what a person can answer: a number of pairs (``1000``, the default), or, to
compare with the AAS paper, a fraction of all N(N-1)/2 pairs (``0.033%``), spent over the
rounds. The samplers' cost does not grow with N^2: they read the k-NN graph's N*k edges
(vectorised), and ``aas`` chooses from a bounded candidate pool (each disagreement
region's best pair plus the ``POOL_FACTOR * count`` best-scored ones, all of them below
``MIN_POOL``) in at most ``MAX_STEPS`` greedy steps (batches of pairs above that), so its
work is O(E + pool * count * D), not one pass over every disputed edge per chosen pair.
Below those bounds (every run up to a few thousand images) the choice is the plain greedy
one, pair by pair (benchmarks/al_sampling_scale.py measures 140,000 embeddings).
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
DEFAULT_BUDGET = 1000  # pairs: a few sittings of one person (about 5 s a pair)
PAPER_BUDGET = "0.033%"  # of all pairs: what the AAS paper's sampler used at its 0.1% cap
MIN_POOL = 100_000  # aas: disputed pairs below this are all candidates (exact greedy)
POOL_FACTOR = 10  # aas: above it, the best POOL_FACTOR * count pairs (+ each region's best)
MAX_STEPS = 512  # aas: greedy steps; more pairs than this are chosen in batches


def parse_budget(text: str | float | int) -> float | int:
    """``"200"`` (pairs, the usual budget) or ``"0.033%"``/``0.00033`` (a fraction of all
    pairs, < 1: to compare with the AAS paper)."""
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

    def implied_mask(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``implied`` for arrays of pairs at once (O(len + n), no Python loop per pair)."""
        n = len(self.uf.parent)
        if not hasattr(self, "_roots"):
            self._roots = self.uf.roots()
            self._cannot_keys = np.array(sorted(x * n + y for x, y in self.cannot), np.int64)
            self._asked_keys = np.array(sorted(x * n + y for x, y in self.asked), np.int64)
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        ra, rb = self._roots[a], self._roots[b]
        out = ra == rb
        if len(self._cannot_keys):
            out |= np.isin(np.minimum(ra, rb) * n + np.maximum(ra, rb), self._cannot_keys)
        if len(self._asked_keys):
            out |= np.isin(np.minimum(a, b) * n + np.maximum(a, b), self._asked_keys)
        return out


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


def _candidate_pool(score: np.ndarray, region: np.ndarray, size: int) -> np.ndarray:
    """Rows of a bounded candidate pool: every region's best-scored pair and the ``size``
    best-scored pairs overall (sorted row numbers, so ties break as without a pool)."""
    if len(score) <= size:
        return np.arange(len(score))
    top = np.argpartition(-score, size - 1)[:size]
    order = np.lexsort((-score, region))  # by region, best first
    first = order[np.r_[True, region[order][1:] != region[order][:-1]]]
    return np.union1d(top, first)


def aas_pairs(
    features: np.ndarray,
    clusterings: Clusterings,
    count: int,
    known: Known,
    *,
    min_pool: int = MIN_POOL,
    pool_factor: int = POOL_FACTOR,
    max_steps: int = MAX_STEPS,
) -> list:
    """Ambiguity-aware pairs: disputed, uncertain, and spread over the space."""
    a, b, s, p = disagreement(clusterings)
    tau = threshold(clusterings.graph, clusterings.dbscan)
    keep = ~known.implied_mask(a, b)
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
    pool = _candidate_pool(score, region, max(min_pool, pool_factor * count))
    a, b, score, region = a[pool], b[pool], score[pool], region[pool]
    _, region = np.unique(region, return_inverse=True)
    x = l2_normalise(features)
    mid = l2_normalise(x[a] + x[b])
    target = min(count, len(a))
    batch = max(1, -(-target // max_steps))
    chosen: list[int] = []
    taken = np.zeros(len(a), dtype=bool)
    covered = np.zeros(int(region.max()) + 1, dtype=bool)
    min_dist = np.full(len(a), 2.0, dtype=np.float32)  # cosine distances lie in [0, 2]
    while len(chosen) < target:
        gain = score * min_dist
        first_pass = not covered.all()  # first one pair per region
        if first_pass:
            gain = np.where(covered[region], -np.inf, gain)
        gain[taken] = -np.inf
        step = _best(gain, region, min(batch, target - len(chosen)), first_pass)
        if not step:
            break
        chosen += step
        taken[step] = True
        covered[region[step]] = True
        if len(step) == 1:  # the plain greedy's arithmetic, bit for bit
            min_dist = np.minimum(min_dist, 1.0 - mid @ mid[step[0]])
        else:
            min_dist = np.minimum(min_dist, (1.0 - mid @ mid[step].T).min(axis=1))
    return [(int(a[k]), int(b[k])) for k in chosen]


def _best(gain: np.ndarray, region: np.ndarray, take: int, one_per_region: bool) -> list[int]:
    """The ``take`` rows of highest finite gain (the first maximum when ``take`` is 1, as
    the plain greedy); at most one per region while regions are being covered."""
    if take == 1:
        k = int(np.argmax(gain))
        return [k] if np.isfinite(gain[k]) else []
    wide = min(len(gain), 4 * take)
    top = np.argpartition(-gain, wide - 1)[:wide]
    top = top[np.lexsort((top, -gain[top]))]
    out, seen = [], set()
    for k in top.tolist():
        if len(out) == take or not np.isfinite(gain[k]):
            break
        if one_per_region:
            if int(region[k]) in seen:
                continue
            seen.add(int(region[k]))
        out.append(k)
    return out


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
    "PAPER_BUDGET",
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
