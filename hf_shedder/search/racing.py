"""Racing on paired per-sample NLL differences: drop a candidate once it provably cannot be the step's best.

Every candidate of a step is measured on the same calibration samples, batch after batch. For two
candidates c and b the per-sample differences of their score contributions vary far less than the
scores themselves (a hard sample is hard for both), so a confidence bound on the *mean paired
difference* separates them after a few batches where the scores alone would not.

Score contributions. The engine's score is ``mean_nll`` (rank by perplexity) or, with
``normalize="params"``, ``(mean_nll - current_nll) / removed_params``. With per-sample NLL ``x_k,i``,
the current plan's per-sample NLL ``c_i`` (or its mean, when only that is known) and ``a_k`` = 1 or
1/removed_params, the contribution ``s_k,i = a_k * (x_k,i - c_i)`` (``c_i`` = 0 for raw perplexity)
averages over all counted samples to exactly the score: so the mean over *all* samples of
``d_i = s_c,i - s_b,i`` is ``score_c - score_b``, and ranking by it is exactly ranking by the score.

The bound. After ``n`` of the ``N`` counted samples, the mean of the ``d_i`` seen estimates the mean of
all ``N`` (the samples are windows drawn at random, so their order is taken as exchangeable). With the
sample standard deviation ``s`` and the finite-population correction for sampling without replacement,
the one-sided bound is ``mean - t(1 - delta_look; n - 1) * s / sqrt(n) * sqrt(1 - n / N)`` (Student t).
When it is above 0, c is worse than b with confidence ``1 - delta_look``; c leaves. ``b`` is the
candidate with the best score on the samples seen so far. A union bound over the ``K - 1`` possible
comparators of the true best and the ``looks`` batches makes ``delta_look = delta / ((K - 1) * looks)``,
so the step's true best is eliminated with probability at most ``delta`` (under the t approximation).
At ``n = N`` the bound is the exact difference; survivors are measured on all data and the engine
picks among them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

DEFAULT_DELTA = 1e-3
DEFAULT_MIN_SAMPLES = 8


def student_t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with integer ``df`` >= 1 (closed form, Abramowitz & Stegun 26.7.3-4)."""
    if t < 0:
        return 1.0 - student_t_sf(-t, df)
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:  # odd: A = 2/pi * (theta + sin * (cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ...))
        term, total = c, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        a = 2.0 / math.pi * (theta + s * total) if df > 1 else 2.0 * theta / math.pi
    else:  # even: A = sin * (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...)
        term, total = 1.0, 0.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c * c * (2 * k - 1) / (2 * k)
        a = s * total
    return max(0.0, (1.0 - a) / 2.0)


@lru_cache(maxsize=4096)
def student_t_quantile(p: float, df: int) -> float:
    """The t with P(T > t) = ``p`` (0 < p < 0.5), by bisection on the closed-form tail."""
    if not 0.0 < p < 0.5:
        raise ValueError(f"tail probability must be in (0, 0.5), got {p}")
    lo, hi = 0.0, 1.0
    while student_t_sf(hi, df) > p:
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if student_t_sf(mid, df) > p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


@dataclass(frozen=True)
class RaceSpec:
    """The statistical budget of one step: ``delta`` per step, split over comparators and looks."""

    delta: float
    candidates: int
    looks: int
    min_samples: int

    @property
    def delta_look(self) -> float:
        return self.delta / (max(1, self.candidates - 1) * max(1, self.looks))

    def to_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "candidates": self.candidates, "looks": self.looks,
                "min_samples": self.min_samples, "delta_look": self.delta_look,
                "bound": "student-t, finite-population corrected, union over comparators x looks"}


def contributions(values: Sequence[float | None], coef: float, current: Sequence[float | None] | float) -> list[float]:
    """Per-sample score contributions ``coef * (x_i - c_i)`` of the counted samples (``None``: no target)."""
    if isinstance(current, (int, float)):
        return [coef * (v - current) for v in values if v is not None]
    return [coef * (v - c) for v, c in zip(values, current) if v is not None]


def paired_bound(diffs: Sequence[float], n_total: int, delta_look: float) -> dict[str, float]:
    """Mean of ``diffs``, the bound's half-width and the lower bound on the mean over all ``n_total``."""
    n = len(diffs)
    mean = math.fsum(diffs) / n
    if n >= n_total:
        return {"mean_diff": mean, "half_width": 0.0, "lower_bound": mean}
    var = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)
    half = student_t_quantile(delta_look, n - 1) * math.sqrt(var / n * (1.0 - n / n_total))
    return {"mean_diff": mean, "half_width": half, "lower_bound": mean - half}


def eliminate(
    spec: RaceSpec,
    active: Sequence[str],
    values: Mapping[str, Sequence[float | None]],
    coef: Mapping[str, float],
    current: Sequence[float | None] | float,
    n_total: int,
) -> list[dict[str, Any]]:
    """The active candidates that provably cannot be the best, each with its bound.

    ``active`` lists the candidates in candidate order, all measured on the same samples; ``values``
    holds their per-sample NLLs. The comparator is the best of them on the samples seen (the first in
    candidate order on ties, as the exact pick).
    """
    if len(active) < 2:
        return []
    contrib = {k: contributions(values[k], coef[k], current) for k in active}
    n = len(contrib[active[0]])
    if any(len(v) != n for v in contrib.values()):
        raise AssertionError("racing needs every active candidate measured on the same samples")
    if n < max(2, spec.min_samples) or n >= n_total:
        return []
    means = {k: math.fsum(v) / n for k, v in contrib.items()}
    leader = min(active, key=lambda k: means[k])  # min() keeps the first of equal keys
    out = []
    for k in active:
        if k == leader:
            continue
        bound = paired_bound([x - y for x, y in zip(contrib[k], contrib[leader])], n_total, spec.delta_look)
        if bound["lower_bound"] > 0.0:
            out.append({"unit": k, "against": leader, "samples": n, **bound})
    return out
