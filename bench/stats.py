"""Percentiles, CDFs and same-run ratios: pure functions over lists of numbers.

Percentiles are nearest-rank on the sorted samples (no interpolation), so a
reported p99.9 is a latency some request really had. Ratios pair rounds:
round r of a path is divided by round r of the reference, which ran moments
before or after it, and the spread of those per-round ratios is reported
beside the pooled one, so noise that hit one round shows as spread instead of
as a difference between paths.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile `q` (0-100) of already sorted, non-empty `ordered`."""
    if not ordered:
        raise ValueError("percentile of no samples")
    rank = max(1, math.ceil(round(q / 100.0 * len(ordered), 6)))  # round: 99.9 / 100 * 1000 is 999.0000000000001
    return ordered[min(rank, len(ordered)) - 1]


def summarize(samples: Sequence[float]) -> dict:
    """count, mean and the PERCENTILES of `samples` (keys p50, p90, p99, p99.9); empty dict for no samples."""
    if not samples:
        return {}
    ordered = sorted(samples)
    result = {"count": len(ordered), "mean": statistics.fmean(ordered), "min": ordered[0], "max": ordered[-1]}
    for q in PERCENTILES:
        result[f"p{q:g}"] = percentile(ordered, q)
    return result


def cdf_points(samples: Sequence[float], points: int = 200) -> list[tuple[float, float]]:
    """(latency, fraction <= it) at `points` evenly spaced fractions plus the 99.9th and 99.99th; for plots."""
    if not samples:
        return []
    ordered = sorted(samples)
    fractions = sorted({i / points for i in range(1, points + 1)} | {0.999, 0.9999})
    return [(percentile(ordered, f * 100), f) for f in fractions]


def spread(values: Sequence[float]) -> dict:
    """median, min and max of per-round values; empty dict when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": len(values)}


def paired_ratios(values: Sequence[float | None], reference: Sequence[float | None]) -> list[float]:
    """values[r] / reference[r] for every round where both exist (and the reference is not 0)."""
    return [v / ref for v, ref in zip(values, reference) if v is not None and ref]
