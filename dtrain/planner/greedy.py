"""Greedy scheduler: the MILP's warm start and its fallback when the MILP finds nothing in time.

A schedule is a set of power-of-two SP groups (total size <= N) and an assignment of items
(sequences, or bucket representatives) to groups. The greedy builds several candidate group
layouts and fills each by LPT (longest processing time first: each item, longest first, goes
to the group where it would finish earliest among the groups that are large enough for its
minimum SP size and still have memory for it), then keeps the layout with the smallest
makespan. Layouts tried:

* uniform: ``N/d`` groups of size ``d`` for every feasible ``d`` (the static SP degrees);
* dedicated: for a target ``T`` (multiples of the ideal lower bound), every item that cannot
  finish within ``T`` on one device gets its own group of the smallest size where it does,
  and the remaining devices become groups of size 1 (and, as a variant, of size 2).

Everything is deterministic (ties broken by group index).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from dtrain.planner.cost import CostModel

TARGET_FACTORS = (1.0, 1.03, 1.08, 1.15, 1.25, 1.4, 1.6, 2.0, 3.0, 5.0)
QUICK_FACTORS = (1.0, 1.15, 1.4, 2.0, 3.0)
# Sizes of the groups the dedicated layouts fill the free devices with; 4 and 8 matter when
# several long sequences share a micro-batch (mixed in-node groups beside their groups).
SMALL_SIZES = (1, 2, 4, 8)
QUICK_SMALL_SIZES = (1, 8)
QUICK_UNIFORM_SIZES = 2
QUICK = {"factors": QUICK_FACTORS, "small_sizes": QUICK_SMALL_SIZES, "uniform_sizes": QUICK_UNIFORM_SIZES}


@dataclass
class Schedule:
    """Groups (sizes) and the items assigned to each, with modeled loads."""

    sizes: list[int]
    members: list[list[int]]
    loads: list[float]
    tokens: list[int]

    @property
    def makespan(self) -> float:
        """The slowest group that runs something (an empty group's load is only its ``c(d)``)."""
        return max((load for load, m in zip(self.loads, self.members) if m), default=0.0)

    def compact(self) -> "Schedule":
        """Drop groups that received no items (their devices simply idle)."""
        keep = [k for k, m in enumerate(self.members) if m]
        return Schedule(
            [self.sizes[k] for k in keep],
            [self.members[k] for k in keep],
            [self.loads[k] for k in keep],
            [self.tokens[k] for k in keep],
        )


def item_times(lengths: list[int], cost: CostModel) -> dict[int, list[float]]:
    """``times[d][i]`` = modeled time of item ``i`` on ``d`` devices, for every candidate ``d``."""
    return {d: cost.seq_times(lengths, d).tolist() for d in cost.group_sizes}


def lpt_fill(
    sizes: list[int],
    lengths: list[int],
    degrees: list[int],
    cost: CostModel,
    order: list[int] | None = None,
    preset: dict[int, int] | None = None,
    times: dict[int, list[float]] | None = None,
) -> Schedule | None:
    """Assign items to fixed groups by LPT with memory checks; None if an item fits nowhere.

    ``preset`` maps item -> group for items placed before the LPT pass; ``times`` is
    :func:`item_times` (computed if not given).
    """
    times = times or item_times(lengths, cost)
    n_groups = len(sizes)
    members: list[list[int]] = [[] for _ in range(n_groups)]
    loads = [cost.group_overhead(d) for d in sizes]  # c(d): paid once the group runs anything
    tokens = [0] * n_groups
    budget_tokens = [cost.tokens_per_device * d for d in sizes]
    for item, g in (preset or {}).items():
        members[g].append(item)
        loads[g] += times[sizes[g]][item]
        tokens[g] += lengths[item]
    heaps: dict[int, list[tuple[float, int]]] = {}
    for g, d in enumerate(sizes):
        heaps.setdefault(d, []).append((loads[g], g))
    for h in heaps.values():
        heapq.heapify(h)
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    placed = set(preset or {})
    todo = [i for i in order if i not in placed]
    # Items longest first (the usual order): a group without room for an item is parked (by
    # free room) until an item short enough for it comes, instead of being popped and pushed
    # back for every item; same choices, far fewer heap operations when memory is tight.
    monotone = all(lengths[a] >= lengths[b] for a, b in zip(todo, todo[1:]))
    parked: dict[int, list[tuple[float, int]]] = {d: [] for d in heaps}
    for i in todo:
        s = lengths[i]
        best: tuple[float, int] | None = None
        for d, heap in heaps.items():
            if d < degrees[i]:
                continue
            park = parked[d]
            while park and tokens[park[0][1]] + s <= budget_tokens[park[0][1]] * (1 + 1e-12):
                g = heapq.heappop(park)[1]
                heapq.heappush(heap, (loads[g], g))
            skipped = []
            while heap:
                load, g = heap[0]
                if tokens[g] + s <= budget_tokens[g] * (1 + 1e-12):
                    cand = (load + times[d][i], g)
                    if best is None or cand < best:
                        best = cand
                    break
                entry = heapq.heappop(heap)
                if monotone:
                    heapq.heappush(park, (tokens[g] - budget_tokens[g], g))
                else:
                    skipped.append(entry)
            for entry in skipped:
                heapq.heappush(heap, entry)
        if best is None:
            return None
        finish, g = best
        d = sizes[g]
        heap = heaps[d]
        if heap[0] == (loads[g], g):  # the usual case: the least-loaded group of its size
            heapq.heapreplace(heap, (finish, g))
        else:  # it was chosen after fuller groups were skipped for memory
            heap.remove((loads[g], g))
            heapq.heapify(heap)
            heapq.heappush(heap, (finish, g))
        loads[g] = finish
        tokens[g] += s
        members[g].append(i)
    return Schedule(list(sizes), members, loads, tokens)


def _dedicated_layout(
    target: float, lengths: list[int], degrees: list[int], cost: CostModel, small: int,
    times: dict[int, list[float]],
) -> tuple[list[int], dict[int, int]] | None:
    n = cost.cluster.num_devices
    sizes_all = cost.group_sizes
    sizes: list[int] = []
    preset: dict[int, int] = {}
    used = 0
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        s = lengths[i]
        if degrees[i] <= small and times[small][i] <= target:
            break  # every later item is shorter, so it also fits a small group in time
        options = [d for d in sizes_all if d >= degrees[i]]
        fast = [d for d in options if times[d][i] <= target]
        d = fast[0] if fast else min(options, key=lambda d: (times[d][i], d))
        if used + d > n:
            return None
        preset[i] = len(sizes)
        sizes.append(d)
        used += d
    sizes.extend([small] * ((n - used) // small))
    return sizes, preset


def greedy_schedule(
    lengths: list[int], degrees: list[int], cost: CostModel, factors: tuple[float, ...] = TARGET_FACTORS,
    small_sizes: tuple[int, ...] = SMALL_SIZES, uniform_sizes: int | None = None,
) -> Schedule | None:
    """Best schedule over the layouts in the module docstring; None if none is feasible.

    ``factors``: the dedicated layouts' targets (multiples of the ideal bound);
    ``small_sizes``: the sizes they fill the free devices with; ``uniform_sizes``: how many
    uniform layouts to try, smallest feasible size first (None: all). The planner ranks
    candidate micro-batch splits with the cheaper :data:`QUICK` settings."""
    n = cost.cluster.num_devices
    if not lengths:
        return Schedule([], [], [], [])
    need = max(degrees)
    best: Schedule | None = None

    def consider(sched: Schedule | None) -> None:
        nonlocal best
        if sched is not None and (best is None or sched.makespan < best.makespan - 1e-12):
            best = sched.compact()

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    times = item_times(lengths, cost)
    for d in [d for d in cost.group_sizes if d >= need][:uniform_sizes]:
        consider(lpt_fill([d] * (n // d), lengths, degrees, cost, order, None, times))
    lower = sum(cost.work(s, d) for s, d in zip(lengths, degrees)) / n
    lower = max(lower, max(min(t[i] for t in times.values()) for i in range(len(lengths))))
    seen: set[tuple[tuple[int, ...], tuple[tuple[int, int], ...]]] = set()
    for small in small_sizes:
        if small not in cost.group_sizes:
            continue
        for factor in factors:
            layout = _dedicated_layout(lower * factor, lengths, degrees, cost, small, times)
            if layout is None:
                continue
            sizes, preset = layout
            key = (tuple(sizes), tuple(sorted(preset.items())))
            if not sizes or key in seen:  # neighbouring targets often give the same layout
                continue
            seen.add(key)
            consider(lpt_fill(sizes, lengths, degrees, cost, order, preset, times))
    return best
