"""Interleaved rounds and the medians and ratios drawn from them.

Methods are timed round robin in a rotating order, so background load that drifts during a
benchmark hits every method alike; every reported figure is a median.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator


def rotate(items: list, r: int) -> list:
    r %= max(len(items), 1)
    return items[r:] + items[:r]


def rounds(names: list[str], warmup: int, runs: int) -> Iterator[tuple[int, bool, list[str]]]:
    """(round, timed?, order of names) for `warmup` untimed then `runs` timed rounds."""
    for r in range(warmup + runs):
        yield r, r >= warmup, rotate(names, r)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired(a: list[float] | None, b: list[float] | None) -> float | None:
    """Median of a[i] / b[i] over rounds i: a pair timed back to back cancels drifting load."""
    if not a or not b:
        return None
    return statistics.median(x / y for x, y in zip(a, b))
