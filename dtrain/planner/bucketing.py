"""Length bucketing by dynamic programming.

The MILP works on ``Q`` buckets instead of individual sequences. Sorting the distinct
lengths ``u_1 < ... < u_U`` (multiplicities ``c_k``), a bucket is a contiguous run
``u_{i+1..j}`` represented by its *largest* length ``u_j`` (so a plan that fits the
representative fits every member: memory is never under-estimated). The padding error of a
bucket is ``sum_k c_k (w(u_j) - w(u_k))`` (``w`` = identity: padding tokens; the planner uses
the modeled compute of a length so that padding is weighed by its cost); we choose the split into at most ``Q`` buckets
that minimises the total padding error::

    E[q][j] = min_{i < j} E[q-1][i] + cost(i, j)
    cost(i, j) = w(u_j) (C_j - C_i) - (S_j - S_i)     (C, S prefix sums of c_k and c_k w(u_k))

``O(Q U^2)`` with the minimisation vectorised in numpy over blocks of columns (U <= batch size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Bucket:
    """A run of sorted lengths represented by ``length`` (its maximum)."""

    length: int
    members: tuple[int, ...]  # indices into the batch, longest first (ties: lower index)

    @property
    def count(self) -> int:
        return len(self.members)


def padding_error(
    lengths: list[int], buckets: list[Bucket], weight: Callable[[float], float] | None = None
) -> float:
    """Total padding: sum over members of ``w(bucket.length) - w(length)`` (w = identity: tokens)."""
    w = weight or (lambda x: x)
    return sum(w(b.length) - w(lengths[i]) for b in buckets for i in b.members)


def bucket_lengths(
    lengths: list[int], max_buckets: int, weight: Callable[[np.ndarray], np.ndarray] | None = None
) -> list[Bucket]:
    """Split the batch into at most ``max_buckets`` buckets with minimal padding error.

    ``weight`` maps lengths to the quantity whose padding is measured (default: the length
    itself, i.e. padding tokens); it must be non-decreasing. The planner passes the modeled
    compute ``alpha1 s^2 + alpha2 s`` so that padding a long sequence costs what it costs.
    Deterministic: returns buckets longest first; members sorted longest first then by index.
    """
    if max_buckets < 1:
        raise ValueError("max_buckets must be >= 1")
    if not lengths:
        return []
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    u = values.astype(np.float64)
    if weight is not None:
        u = np.asarray(weight(u), dtype=np.float64)
    n_unique = len(values)
    q_max = min(max_buckets, n_unique)
    cum_c = np.concatenate([[0.0], np.cumsum(counts.astype(np.float64))])
    cum_s = np.concatenate([[0.0], np.cumsum(counts * u)])
    inf = float("inf")
    # err[q][j]: best error covering the first j distinct values with q buckets.
    err = np.full((q_max + 1, n_unique + 1), inf)
    arg = np.zeros((q_max + 1, n_unique + 1), dtype=np.int64)
    err[0][0] = 0.0
    # cost[i, j] for a block of columns j at a time: O(U * block) memory, numpy inner loops.
    block = 256
    rows = np.arange(n_unique + 1)[:, None]
    u_col = np.concatenate([[0.0], u])  # w(u_j) for column j (1-based)
    blocks = []
    for lo in range(1, n_unique + 1, block):
        cols = np.arange(lo, min(lo + block, n_unique + 1))
        cost = u_col[cols][None, :] * (cum_c[cols][None, :] - cum_c[:, None]) - (
            cum_s[cols][None, :] - cum_s[:, None]
        )
        blocks.append((cols, np.where(rows < cols[None, :], cost, inf)))
    for q in range(1, q_max + 1):
        prev = err[q - 1][:, None]
        for cols, cost in blocks:
            cand = prev + cost
            best = np.argmin(cand, axis=0)  # first minimum: deterministic
            arg[q][cols] = best
            err[q][cols] = cand[best, np.arange(len(cols))]
    # Fewer buckets can never be better than more (splitting never adds padding), but take the
    # minimum over q for safety and the smallest q that achieves it.
    best_q = int(np.argmin(err[1:, n_unique])) + 1
    cuts: list[tuple[int, int]] = []
    j, q = n_unique, best_q
    while q > 0:
        i = int(arg[q][j])
        cuts.append((i, j))
        j, q = i, q - 1
    by_value: dict[int, list[int]] = {}
    for idx, s in sorted(enumerate(lengths), key=lambda t: (-t[1], t[0])):
        by_value.setdefault(int(s), []).append(idx)
    buckets = []
    for i, j in cuts:  # cuts come out longest bucket first
        members: list[int] = []
        for v in values[i:j][::-1]:
            members.extend(by_value[int(v)])
        buckets.append(Bucket(length=int(values[j - 1]), members=tuple(members)))
    return buckets
