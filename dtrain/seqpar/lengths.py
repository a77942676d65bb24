"""Sequence-length mixes for the example and the benchmark, scaled to CPU-sized models.

The shapes follow the planner's workloads (:func:`dtrain.planner.sample_lengths`) at about 1/32 of
their lengths, so one batch trains in seconds on a CPU:

* ``longtail``: 70 % chat turns around 64 tokens, 27 % documents around 512, 3 % giants of
  ``max_len/2`` to ``max_len`` (log-uniform; at least one per batch);
* ``lognormal``: median 256, sigma 1.0, clipped to [16, ``max_len``];
* ``fixed``: every sequence ``max_len / 4`` tokens.

Deterministic for a seed; torch-free (numpy).
"""
from __future__ import annotations

import math

import numpy as np

MIXES = ("longtail", "lognormal", "fixed")


def sample_lengths(mix: str, count: int, seed: int, max_len: int = 2048) -> list[int]:
    """``count`` lengths of ``mix`` (module docstring), each in [2, ``max_len``]."""
    rng = np.random.default_rng(seed)
    if mix == "longtail":
        kind = rng.random(count)
        x = np.where(kind < 0.70, rng.lognormal(math.log(64), 0.5, count), rng.lognormal(math.log(512), 0.3, count))
        giants = kind >= 0.97
        if not giants.any():
            giants[rng.integers(count)] = True
        x[giants] = np.exp(rng.uniform(math.log(max_len / 2), math.log(max_len), int(giants.sum())))
    elif mix == "lognormal":
        x = rng.lognormal(math.log(256), 1.0, count)
    elif mix == "fixed":
        x = np.full(count, max_len / 4)
    else:
        raise ValueError(f"unknown length mix {mix!r}; choose one of {', '.join(MIXES)}")
    return [int(v) for v in np.clip(x, 16 if mix != "fixed" else 2, max_len)]
