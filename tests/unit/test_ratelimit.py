"""Token bucket."""

from __future__ import annotations

import pytest

from relay.core.ratelimit import TokenBucket


def test_burst_then_sustained_rate() -> None:
    bucket = TokenBucket(rate_per_s=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.05)
    assert bucket.take(0.1)
    assert not bucket.take(0.1)


def test_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate_per_s=100.0, burst=2, now=0.0)
    assert sum(bucket.take(1000.0) for _ in range(5)) == 2


def test_clock_going_backwards_refills_nothing() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_invalid_parameters_are_our_bug() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1, 0.0)
    with pytest.raises(ValueError):
        TokenBucket(1.0, 0, 0.0)
