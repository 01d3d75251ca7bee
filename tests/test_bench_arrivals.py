"""The benchmark's paced arrivals (bench/load.py ``arrival_offsets``).

The end-of-data targets of issue 11 are judged at a paced load, so the schedule decides what the
waits mean: evenly spaced messages at 50 msg/s come in step with the 20 ms DNS miss, and a schedule
that is not the same for every set-up would compare them on different traffic.
"""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from benchmodules import load_bench_module

load = load_bench_module("load")
ARRIVALS, arrival_offsets = load.ARRIVALS, load.arrival_offsets


def _gaps(offsets: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(offsets)]


def test_even_arrivals_are_one_period_apart() -> None:
    assert arrival_offsets(4, 50.0, "even") == [0.0, 0.02, 0.04, 0.06]


def test_poisson_arrivals_are_the_same_schedule_for_every_setup() -> None:
    assert arrival_offsets(1000, 50.0, "poisson") == arrival_offsets(1000, 50.0, "poisson")
    assert arrival_offsets(1000, 50.0, "poisson", seed=12) != arrival_offsets(1000, 50.0, "poisson")


def test_poisson_arrivals_offer_the_rate_exactly() -> None:
    offsets = arrival_offsets(1000, 50.0, "poisson")
    assert len(offsets) == 1000
    assert offsets[0] == 0.0
    assert offsets == sorted(offsets)
    # 1,000 messages in 20 s: the rate offered, not a sample's (a sum of exponential gaps would
    # be off by about 3 %, as 1/sqrt(1000)).
    assert offsets[-1] <= 20.0
    assert offsets[-1] > 19.9


def test_poisson_gaps_are_exponential() -> None:
    """Gaps of every length: as many short ones as an exponential distribution has, and a spread
    (coefficient of variation) of about 1, where even arrivals have none."""
    rate = 50.0
    gaps = _gaps(arrival_offsets(5000, rate, "poisson"))
    variation = statistics.stdev(gaps) / statistics.mean(gaps)
    assert 0.9 < variation < 1.1
    short = sum(1 for gap in gaps if gap < 0.25 / rate) / len(gaps)
    assert math.isclose(short, 1 - math.exp(-0.25), abs_tol=0.03)
    assert statistics.stdev(_gaps(arrival_offsets(5000, rate, "even"))) < 1e-9


@pytest.mark.parametrize("count", [0, 1])
def test_poisson_arrivals_of_none_or_one(count: int) -> None:
    assert arrival_offsets(count, 50.0, "poisson") == [0.0] * count


def test_unknown_arrivals_are_refused() -> None:
    assert "bursty" not in ARRIVALS
    with pytest.raises(ValueError, match="bursty"):
        arrival_offsets(10, 50.0, "bursty")
