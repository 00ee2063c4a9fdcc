"""Log-log fits of cost against N, and projections from them.

A cost that grows like ``c·N^p`` is a straight line of slope ``p`` on log-log axes;
:func:`fit_exponent` finds ``p`` and ``c`` by least squares on ``(log N, log cost)``.
The benchmark uses the fits twice: to report how each method scales (an approximate
method should show ~1 for time, exact attention ~2), and to project what a larger case
would cost before running it, so that a case over budget is skipped with its projected
cost instead of being run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Fit", "fit_exponent", "project", "break_even"]


@dataclass(frozen=True)
class Fit:
    """``cost ≈ coef · N ** exponent`` over the points ``ns``."""

    exponent: float
    coef: float
    ns: tuple[int, ...]

    def at(self, n: float) -> float:
        return self.coef * n**self.exponent


def fit_exponent(ns: Sequence[float], costs: Sequence[float | None]) -> Fit | None:
    """Least-squares slope of log(cost) against log(N); None with fewer than 2 usable points.

    Points whose cost is None or <= 0 are left out (not measured, skipped, failed).

    Raises:
        ValueError: ``ns`` and ``costs`` differ in length.
    """
    if len(ns) != len(costs):
        raise ValueError(f"fit_exponent: {len(ns)} lengths but {len(costs)} costs")
    pts = [(n, c) for n, c in zip(ns, costs) if c is not None and c > 0 and n > 0]
    if len({n for n, _ in pts}) < 2:
        return None
    xs = [math.log(n) for n, _ in pts]
    ys = [math.log(c) for _, c in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    p = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return Fit(exponent=p, coef=math.exp(my - p * mx), ns=tuple(int(n) for n, _ in pts))


def project(
    ns: Sequence[float], costs: Sequence[float | None], n: float, *, min_exponent: float = 1.0,
    default_exponent: float = 2.0, last: int = 3,
) -> tuple[float, float] | None:
    """Projected cost at ``n`` from measured (N, cost) points: ``(cost, exponent used)``.

    Fits the ``last`` largest measured points.  The exponent is at least
    ``min_exponent``: at small N fixed overheads flatten the curve, and no attention
    method costs less than linear time or memory in N, so a flatter fit would
    under-project.  With a single point ``default_exponent`` is assumed (2: exact
    attention, an upper bound for the others).  None when nothing was measured.
    """
    pts = sorted((m, c) for m, c in zip(ns, costs) if c is not None and c > 0)[-last:]
    if not pts:
        return None
    fit = fit_exponent([m for m, _ in pts], [c for _, c in pts])
    exponent = default_exponent if fit is None else max(min_exponent, fit.exponent)
    n0, c0 = pts[-1]
    return c0 * (n / n0) ** exponent, exponent


def break_even(ns: Sequence[int], speedups: dict[int, float | None]) -> int | None:
    """Smallest N from which the method is faster (speed-up > 1) at that and every larger N."""
    faster = [n for n in ns if (speedups.get(n) or 0) > 1
              and all((speedups.get(m) or 0) > 1 for m in ns if m > n)]
    return min(faster) if faster else None
