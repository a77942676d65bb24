"""Length bucketing DP: equals brute force on small inputs, error bounds, determinism."""
from __future__ import annotations

import itertools
import random

import pytest

from dtrain.planner.bucketing import bucket_lengths, padding_error


def brute_force_error(lengths: list[int], q: int, weight=lambda x: x) -> float:
    values = sorted(set(lengths))
    best = float("inf")
    for k in range(1, min(q, len(values)) + 1):
        for cuts in itertools.combinations(range(1, len(values)), k - 1):
            bounds = [0, *cuts, len(values)]
            err = 0.0
            for lo, hi in zip(bounds, bounds[1:]):
                top = values[hi - 1]
                err += sum(weight(top) - weight(s) for s in lengths if values[lo] <= s <= top)
            best = min(best, err)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) * 37 for _ in range(rng.randint(1, 11))]
    for q in (1, 2, 3, 5):
        buckets = bucket_lengths(lengths, q)
        assert len(buckets) <= q
        assert padding_error(lengths, buckets) == pytest.approx(brute_force_error(lengths, q))
        quad = lambda x: 3e-3 * x * x + x  # noqa: E731  (compute-weighted padding)
        wb = bucket_lengths(lengths, q, weight=lambda a: 3e-3 * a * a + a)
        assert padding_error(lengths, wb, quad) == pytest.approx(brute_force_error(lengths, q, quad))


def test_buckets_cover_batch_and_represent_by_maximum() -> None:
    rng = random.Random(7)
    lengths = [int(rng.lognormvariate(7.5, 1.2)) + 1 for _ in range(300)]
    buckets = bucket_lengths(lengths, 16)
    members = sorted(i for b in buckets for i in b.members)
    assert members == list(range(len(lengths)))
    for b in buckets:
        assert b.length == max(lengths[i] for i in b.members)
        assert [lengths[i] for i in b.members] == sorted((lengths[i] for i in b.members), reverse=True)
    assert [b.length for b in buckets] == sorted((b.length for b in buckets), reverse=True)


def test_error_bounded_monotone_and_zero_with_enough_buckets() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(100, 60000) for _ in range(200)]
    errors = [padding_error(lengths, bucket_lengths(lengths, q)) for q in (1, 2, 4, 8, 16, 32)]
    assert errors[0] == sum(max(lengths) - s for s in lengths)
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    assert padding_error(lengths, bucket_lengths(lengths, len(set(lengths)))) == 0
    # Never worse than equal-count (quantile) bucketing, a feasible split.
    ordered = sorted(lengths)
    q = 8
    size = -(-len(ordered) // q)
    quantile = sum(max(chunk) - s for k in range(0, len(ordered), size)
                   for chunk in [ordered[k:k + size]] for s in chunk)
    assert errors[3] <= quantile


def test_deterministic_on_a_large_batch() -> None:
    rng = random.Random(11)
    lengths = [rng.randint(64, 262144) for _ in range(1000)]
    a = bucket_lengths(lengths, 16)
    b = bucket_lengths(list(lengths), 16)
    assert a == b
    assert bucket_lengths([], 4) == []
