"""Paired statistics for comparing two versions on the same golden rows.

No scipy: the exact McNemar test is a binomial tail computed with integers, the bootstrap
uses numpy's seeded generator, and ``percentile`` is numpy's default (linear) rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_CHUNK = 256  # bootstrap resamples drawn at once: bounds memory at 256 x rows indices


@dataclass(frozen=True)
class McNemarResult:
    b01: int  # rows a got wrong and b got right
    b10: int  # rows a got right and b got wrong
    p_value: float  # exact two-sided; 1.0 when no row differs

    @property
    def discordant(self) -> int:
        return self.b01 + self.b10


def _paired(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired samples need the same rows: got {len(a)} and {len(b)} values")


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemarResult:
    """Exact McNemar test of paired correctness: under "a and b are equally good" each
    discordant row favours b with probability 1/2, so p = 2 P(X <= min(b01, b10)),
    X ~ Binomial(b01 + b10, 1/2), capped at 1."""
    _paired(a, b)
    b01 = sum(1 for x, y in zip(a, b, strict=True) if not x and y)
    b10 = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n = b01 + b10
    if n == 0:
        return McNemarResult(0, 0, 1.0)
    tail = sum(math.comb(n, k) for k in range(min(b01, b10) + 1))
    # integers until the one division: exact for any n (a float 2**n overflows past 1023)
    return McNemarResult(b01, b10, min(1.0, 2 * tail / 2**n))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) with linear interpolation between the closest
    ranks: numpy.percentile's default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bootstrap_diff(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Paired bootstrap of mean(b - a): (observed difference, low, high) of a ``level``
    percentile interval. Rows are resampled together, so what both versions find hard
    does not widen the interval."""
    _paired(a, b)
    if not a:
        raise ValueError("bootstrap of no rows")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap needs resamples >= 1 and 0 < level < 1 (got {resamples}, {level})")
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means: list[float] = []
    for start in range(0, resamples, _CHUNK):
        idx = rng.integers(0, len(diffs), size=(min(_CHUNK, resamples - start), len(diffs)))
        means += diffs[idx].mean(axis=1).tolist()
    tail = (1.0 - level) / 2 * 100
    return float(diffs.mean()), percentile(means, tail), percentile(means, 100 - tail)


def sign_flip_p(a: Sequence[float], b: Sequence[float], *, resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(b - a) = 0 for graded (non-binary) scores such
    as token F1: under the null each row's difference is as likely negated, so the p-value is
    the share of random sign flips whose mean is at least as far from 0 as the observed one
    (with the observed one counted, so p > 0). McNemar's test would need right/wrong grades,
    which throws away a uniform drop in partial credit."""
    _paired(a, b)
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    observed = abs(float(diffs.mean())) if len(diffs) else 0.0
    if not diffs.any():
        return 1.0
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, _CHUNK):
        n = min(_CHUNK, resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(n, len(diffs)))
        hits += int((np.abs((signs * diffs).mean(axis=1)) >= observed - 1e-12).sum())
    return (hits + 1) / (resamples + 1)
