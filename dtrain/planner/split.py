"""Micro-batch splits that put the long sequences ("giants") where they run cheaply.

Why (measured in ``docs/flexsp-planner.md``): the balanced split of
:func:`dtrain.planner.solve.split_micro_batches` spreads the work evenly, so every
micro-batch gets one of the longest sequences. Each micro-batch then lasts at least as long as
its giant on a 32-device, cross-node group (the only size on which it finishes in a short
micro-batch), and the step pays that communication-bound time once per micro-batch. A better
step runs the few longest giants together in one *long* micro-batch on small, in-node groups
(cheap in device-seconds), packs the next giants by size into shorter micro-batches, and
spreads the short sequences over the devices the giants leave free.

:func:`giant_first_splits` builds such splits for a few opener policies;
:func:`dtrain.planner.solve._choose_split` ranks them with a quick greedy. (The sum of the
micro-batches' comm-aware bounds was tried as a cheaper ranking; it ignores memory and whole
groups, and on seeds 0, 3 and 6 its pick was 7 to 23% slower than the greedy's.)
"""
from __future__ import annotations

import heapq

import numpy as np

from dtrain.planner.cost import CostModel

# (first micro-batch, later ones): the opener's group is scale x its minimum size (clipped).
# Ordered by how often each won on generated long-tail batches; the planner tries them in
# this order while its split budget lasts.
OPENER_SCALES = ((2, 2), (1, 1), (2, 1), (1, 2), (4, 4), (4, 2), (2, 4), (4, 1), (1, 4))
GIANT_UTILISATION = 0.9  # share of a micro-batch's device-time its giants may take


class BatchTimes:
    """Per-sequence times ``t(s_i, d)`` and device-seconds ``d t(s_i, d)`` for all allowed
    sizes (``inf`` below the sequence's minimum size), computed once per batch."""

    def __init__(self, lengths: list[int], degrees: list[int], cost: CostModel) -> None:
        self.sizes = np.asarray(cost.group_sizes, dtype=np.float64)
        s = np.asarray(lengths, dtype=np.float64)
        times = np.stack([cost.seq_times(s, int(d)) for d in self.sizes], axis=1)
        allowed = np.asarray(degrees)[:, None] <= self.sizes[None, :]
        self.times = np.where(allowed, times, np.inf)
        self.work = self.times * self.sizes[None, :]
        self.n_dev = cost.cluster.num_devices
        self.cheapest: list[float] = self.work.min(axis=1).tolist()  # device-seconds at best size


def giant_first_splits(
    lengths: list[int], degrees: list[int], cost: CostModel, bt: BatchTimes, fill: float,
) -> list[list[list[int]]]:
    """Candidate splits (lists of micro-batches of sequence indices; see module docstring).

    Giants are the sequences that need more than one device. Each micro-batch is opened by the
    longest remaining giant on ``scale x`` its minimum size (that fixes the micro-batch's
    target time ``tau``); the next giants, longest first, join it while their cheapest
    configuration within ``tau`` fits the device-time, the devices and the memory left. The
    other sequences then go, largest first, to the micro-batch with the most free
    device-time that has memory for them (or to one extra micro-batch). Deterministic.
    """
    n_dev = cost.cluster.num_devices
    room = n_dev * cost.tokens_per_device * fill
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    giants = [i for i in order if degrees[i] > 1]
    rest = [i for i in order if degrees[i] <= 1]
    if not giants:
        return []
    sizes = bt.sizes
    out: list[list[list[int]]] = []
    seen: set[tuple[tuple[int, ...], ...]] = set()
    layouts: list[tuple[list[list[int]], list[float], list[float], list[float]]] = []
    for first_scale, scale in OPENER_SCALES:
        parts: list[list[int]] = []
        taus: list[float] = []
        giant_work: list[float] = []
        tokens: list[float] = []
        left = list(giants)
        while left:
            opener = left.pop(0)
            k_scale = first_scale if not parts else scale
            d = min(float(degrees[opener] * k_scale), float(sizes[-1]))
            col = int(np.searchsorted(sizes, d))
            tau = float(bt.times[opener, col])
            part, work, toks = [opener], float(bt.work[opener, col]), float(lengths[opener])
            devices = float(sizes[col])  # devices of sequences longer than tau / 2 (disjoint)
            keep = []
            for g in left:
                ok = bt.times[g] <= tau
                if not ok.any() or toks + lengths[g] > room:
                    keep.append(g)
                    continue
                c = int(np.argmin(np.where(ok, bt.work[g], np.inf)))
                w = float(bt.work[g, c])
                big = float(sizes[c]) if float(bt.times[g, c]) > tau / 2 else 0.0
                if work + w > GIANT_UTILISATION * n_dev * tau or devices + big > n_dev:
                    keep.append(g)
                    continue
                part.append(g)
                work += w
                toks += lengths[g]
                devices += big
            left = keep
            parts.append(part)
            taus.append(tau)
            giant_work.append(work)
            tokens.append(toks)
        layouts.append((parts, taus, giant_work, tokens))
    for extra in (0, 1):  # variants with one more micro-batch for the short sequences last
        for parts, taus, giant_work, tokens in layouts:
            cand = _fill(parts, taus, giant_work, tokens, rest, lengths, bt, room, extra)
            key = tuple(tuple(sorted(p)) for p in cand)
            if key not in seen:
                seen.add(key)
                out.append(cand)
    return out


def _fill(
    giant_parts: list[list[int]], taus: list[float], giant_work: list[float], tokens: list[float],
    rest: list[int], lengths: list[int], bt: BatchTimes, room: float, extra: int,
) -> list[list[int]]:
    parts = [list(p) for p in giant_parts] + [[] for _ in range(extra)]
    toks = list(tokens) + [0.0] * extra
    # Max-heap on free device-time (ties: lower index); an entry whose part lacks the memory
    # for the current sequence is set aside and pushed back after it is placed.
    heap = [(-(bt.n_dev * t - w), k) for k, (t, w) in enumerate(zip(taus, giant_work))]
    heap += [(0.0, len(giant_parts) + e) for e in range(extra)]
    heapq.heapify(heap)
    cheapest = bt.cheapest
    for i in rest:
        s = lengths[i]
        aside = []
        while heap and toks[heap[0][1]] + s > room:
            aside.append(heapq.heappop(heap))
        if heap:
            neg_free, k = heapq.heappop(heap)
        else:
            parts.append([])
            toks.append(0.0)
            neg_free, k = 0.0, len(parts) - 1
        parts[k].append(i)
        toks[k] += s
        heapq.heappush(heap, (neg_free + cheapest[i], k))
        for entry in aside:
            heapq.heappush(heap, entry)
    return [p for p in parts if p]  # giants, then the rest: both longest first already
