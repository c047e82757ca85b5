"""Is a difference between two models real? Paired statistics of per-query metric values.

Two models scored on the same queries give, per query, a baseline value a_i and a candidate value b_i. The
candidate's advantage is the mean of the differences d_i = b_i - a_i, and two resampling procedures say how sure
it is (the ones IR evaluation recommends: Smucker, Allan & Carterette, CIKM 2007):

- a paired percentile bootstrap interval: draw the queries with replacement B times, take the mean of d each time;
  the interval holds the central ``confidence`` share of those B means (Efron & Tibshirani 1993, ch. 13);
- a two-sided paired randomisation (sign-flip) test: with no difference, a query's two values are exchangeable,
  so d_i is as likely as -d_i; over R random sign flips, p = (1 + #{|flipped mean| >= |observed mean|}) / (1 + R)
  (the observed assignment counts once, so p is never 0: Phipson & Smyth 2010).

``differences`` may hold one column per metric: every resample then reuses the same queries (or signs) for every
metric. Resamples go in chunks of at most ``max_elements`` draws, so memory is bounded for any number of queries.
Each draw is one uniform double of a seeded ``numpy.random.Generator``, taken in (resample, query) order, so the
results depend on the seed alone, not on the chunk size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

MAX_ELEMENTS = 1 << 22  # draws per chunk: 32 MB of doubles, plus as much for the values they pick


class PairedComparison(NamedTuple):
    """Mean of candidate - baseline, its bootstrap interval [low, high] and the randomisation test's p-value; each a
    float, or an (M,) array for M metrics."""

    difference: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    p_value: float | np.ndarray


def compare_paired(baseline, candidate, *, samples: int = 10_000, permutations: int = 10_000,
                   confidence: float = 0.95, seed: int = 0, max_elements: int = MAX_ELEMENTS) -> PairedComparison:
    """Paired comparison of ``candidate`` against ``baseline``. Shapes: both (Q,) or both (Q, M), row i = query i.

    The bootstrap and the test draw from two independent streams spawned from ``seed``.
    """
    baseline, candidate = np.asarray(baseline, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if baseline.shape != candidate.shape:
        raise ValueError(f"Paired values need equal shapes, got {baseline.shape} and {candidate.shape}.")
    differences = candidate - baseline
    bootstrap_seed, permutation_seed = np.random.SeedSequence(seed).spawn(2)
    low, high = bootstrap_interval(differences, samples=samples, confidence=confidence, seed=bootstrap_seed,
                                   max_elements=max_elements)
    p_value = sign_flip_p_value(differences, permutations=permutations, seed=permutation_seed,
                                max_elements=max_elements)
    difference = differences.mean(axis=0)
    return PairedComparison(_scalar(difference), low, high, p_value)


def bootstrap_interval(differences, *, samples: int = 10_000, confidence: float = 0.95, seed=0,
                       max_elements: int = MAX_ELEMENTS) -> tuple:
    """Percentile interval of the mean of ``differences`` over ``samples`` resamples of the queries. Shapes:
    differences (Q,) or (Q, M) -> (low, high), each a float or (M,). ``seed``: an int, SeedSequence or Generator."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}.")
    means = bootstrap_means(differences, samples=samples, seed=seed, max_elements=max_elements)  # (samples, M)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], axis=0)  # numpy's default (linear) interpolation
    return _scalar(low, np.ndim(differences)), _scalar(high, np.ndim(differences))


def bootstrap_means(differences, *, samples: int = 10_000, seed=0, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """Means of ``samples`` resamples (queries drawn with replacement). Shapes: (Q,) or (Q, M) -> (samples, M)."""
    values = _columns(differences)
    queries = values.shape[0]
    rng = np.random.default_rng(seed)
    means = np.empty((_positive(samples, "samples"), values.shape[1]))
    start = 0
    for rows in _chunks(samples, queries, max_elements):
        # floor(u * Q) rather than rng.integers: one double per draw keeps the stream independent of the chunking
        picks = np.minimum((rng.random((rows, queries)) * queries).astype(np.intp), queries - 1)  # (rows, Q)
        for column in range(values.shape[1]):  # one metric at a time bounds the gathered (rows, Q) values
            means[start:start + rows, column] = values[picks, column].mean(axis=1)
        start += rows
    return means


def sign_flip_p_value(differences, *, permutations: int = 10_000, seed=0,
                      max_elements: int = MAX_ELEMENTS) -> float | np.ndarray:
    """Two-sided paired randomisation test of mean(differences) = 0. Shapes: (Q,) -> float, (Q, M) -> (M,).

    Identical models (all differences 0) give p = 1; no flip reaching the observed mean gives 1 / (1 + R).
    """
    values = _columns(differences)
    queries = values.shape[0]
    rng = np.random.default_rng(seed)
    observed = np.abs(values.sum(axis=0))  # sums rank flips exactly as means do
    # A flip that only moves zeros (or re-orders the sum) equals the observed sum up to rounding; it must count.
    tolerance = 1e-9 * np.abs(values).sum(axis=0)
    at_least = np.zeros(values.shape[1], dtype=np.int64)
    for rows in _chunks(_positive(permutations, "permutations"), queries, max_elements):
        signs = np.where(rng.random((rows, queries)) < 0.5, -1.0, 1.0)  # (rows, Q)
        at_least += (np.abs(signs @ values) >= observed - tolerance).sum(axis=0)  # (rows, M) -> (M,)
    return _scalar((at_least + 1) / (permutations + 1), np.ndim(differences))


def _columns(differences) -> np.ndarray:
    """(Q,) or (Q, M) finite values with Q >= 1 -> (Q, M) float64."""
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim not in (1, 2) or values.shape[0] == 0:
        raise ValueError(f"Expected per-query values of shape (Q,) or (Q, M) with Q >= 1, got {values.shape}.")
    if not np.isfinite(values).all():
        raise ValueError("Per-query values must be finite.")
    return values[:, None] if values.ndim == 1 else values


def _chunks(total: int, queries: int, max_elements: int) -> Iterator[int]:
    """Resamples per chunk, each chunk at most ``max_elements`` draws (at least one resample)."""
    step = max(1, max_elements // queries)
    for start in range(0, total, step):
        yield min(step, total - start)


def _positive(count: int, name: str) -> int:
    if count < 1:
        raise ValueError(f"{name} must be >= 1, got {count}.")
    return count


def _scalar(values: np.ndarray, ndim: int | None = None):
    """A float for one metric given as (Q,), else the (M,) array."""
    values = np.asarray(values, dtype=np.float64)
    if ndim == 1 or values.ndim == 0:
        return float(values.reshape(-1)[0])
    return values
