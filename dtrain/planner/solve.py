"""FlexSP planning of one batch: micro-batch split, bucketing, greedy, MILP, sequence assignment.

Pipeline for a batch of lengths on ``N`` devices:

1. Validate the batch and derive each sequence's minimum SP size (:class:`CostModel`); group
   sizes are :attr:`CostModel.group_sizes`, the powers of two that divide the head count.
2. Split into micro-batches (:func:`_choose_split`): ``K0 = ceil(tokens / (N *
   tokens_per_device * fill))`` balanced parts (sequences, largest compute work first, go
   to the part with the least work that still has token room), ``K0 + 1`` balanced parts,
   and the giant-first splits of :mod:`dtrain.planner.split` (the longest sequences
   together in long micro-batches on small groups, the short ones in the devices they leave
   free); a quick greedy ranks them and the fastest is kept (``docs/flexsp-planner.md``
   says why the balanced split loses on long-tail mixes), then a local search moves and
   swaps the long sequences between its micro-batches (at most ``move_budget`` quick-greedy
   evaluations, a count rather than a time, so the split is the same on every rank
   whatever the load). If a micro-batch cannot be
   scheduled, the planner falls back to balanced splits with ``K`` growing by one.
3. Per micro-batch (budget: its share of what is left of ``0.75 * time_limit_s``):

   a. greedy schedule on the true lengths (:mod:`greedy`): the incumbent;
   b. aggregated lower bound on the true lengths by bisection (:mod:`aggregate`; the 32
      longest sequences as their own classes, the rest in 24 DP buckets), up to 60% of the
      budget; the group layouts of its feasible probes are filled with the true lengths by
      LPT and kept when faster;
   c. unless the incumbent is already within ``gap_rel`` of the bound: bucket the lengths
      (:mod:`bucketing`), warm-start the MILP (:mod:`milp`) with the better (bucketed
      makespan) of the greedy on the representatives and the incumbent counted per bucket,
      give it the bound as a lower bound on ``T``, solve until 90% of the budget, and assign
      the real sequences to the MILP's groups (per bucket, longest first, to the group with
      that bucket's quota and the smallest current load; ties by group order); the faster
      of that and the incumbent on the true lengths is kept;
   d. if the MILP improved the incumbent, re-probe the bound just below it with what is left.

   The slot MILP grows with ``N`` (about ``buckets x 2N`` columns); above
   ``MILP_MAX_COLUMNS`` (reached from about 512 devices) it cannot be built and solved within
   the budget, so step c is skipped there; the aggregated model does not grow with ``N``. A
   micro-batch whose budget is below ``MIN_BUDGET_S`` keeps its greedy schedule.

   The micro-batch records ``lower_bound_s`` (the larger of the comm-aware and aggregated
   bounds on its true lengths); ``StepPlan.plan_gap`` sums them.
4. Place groups on aligned contiguous ranks and verify memory (a violation is a bug and
   raises).

The split is deterministic for the same input (a fixed count of candidates and moves); the
plan is as long as the MILP and the bound's probes stop on their own rather than on a time limit (what a
time-out leaves depends on machine speed; ``solver="greedy"`` with a generous limit is
deterministic). A runtime should plan on one rank and broadcast the plan.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from dtrain.planner.aggregate import aggregate_lower_bound
from dtrain.planner.bucketing import bucket_lengths
from dtrain.planner.cost import CostModel
from dtrain.planner.errors import PlannerError
from dtrain.planner.greedy import QUICK, Schedule, greedy_schedule, lpt_fill
from dtrain.planner.milp import MilpResult, solve_milp
from dtrain.planner.plan import GroupPlan, MicroBatch, StepPlan, place_groups
from dtrain.planner.split import BatchTimes, giant_first_splits


MILP_MAX_COLUMNS = 12000  # slot-MILP size (about buckets x slots) above which it is skipped
FULL_GREEDY_BUDGET_S = 0.1  # budget below which a micro-batch keeps the split search's quick greedy
MIN_BUDGET_S = 0.03  # below this, a micro-batch keeps its greedy schedule (time limit spent)
MICRO_BATCH_SHARE = 0.75  # of the time limit, by the end of the micro-batches (the rest: placement)
BOUND_BUCKETS = 24  # DP buckets of the aggregated bound (plus the exact longest sequences)
BOUND_EXACT_TOP = 32  # longest sequences that keep their own class in the aggregated bound
BOUND_SHARE = 0.6  # share of a micro-batch's budget for the aggregated bound before the MILP
MILP_END = 0.9  # the MILP must stop by this share of the budget; the rest re-probes the bound
LAYOUTS_TRIED = 3  # feasible aggregated layouts filled by LPT on the real lengths
MOVE_CANDIDATES = 24  # longest sequences the split's local search may move
MOVE_STARTS = 1  # best-ranked candidate splits the local search starts from (2, half the budget each: worse on 5 of 8 seeds)


@dataclass(frozen=True)
class PlannerOptions:
    """Knobs of :func:`plan_step`."""

    max_buckets: int = 16
    time_limit_s: float = 1.0  # total planning budget per batch (MILP limits share it)
    gap_rel: float = 0.01  # MILP relative gap at which the solver stops
    solver: str = "highs"  # "highs", "cbc" or "greedy" (no MILP)
    memory_fill: float = 0.95  # target fraction of memory when choosing K micro-batches
    giant_splits: bool = True  # also try the giant-first splits of dtrain.planner.split
    move_budget: int = 40  # local-search evaluations on the chosen split (0: none; a count, not a time)

    def __post_init__(self) -> None:
        if self.solver not in ("highs", "cbc", "greedy"):
            raise PlannerError(f"unknown solver {self.solver!r}; use highs, cbc or greedy")
        if (self.max_buckets < 1 or self.time_limit_s <= 0 or not 0 < self.memory_fill <= 1
                or self.move_budget < 0):
            raise PlannerError(
                "planner options need max_buckets >= 1, time_limit_s > 0, 0 < memory_fill <= 1, "
                "move_budget >= 0"
            )


def split_micro_batches(
    lengths: list[int], degrees: list[int], cost: CostModel, k: int, fill: float
) -> list[list[int]]:
    """Deterministic balanced split of the batch into ``k`` parts (indices, longest first)."""
    room = cost.cluster.num_devices * cost.tokens_per_device * fill
    work = [0.0] * k
    tokens = [0] * k
    parts: list[list[int]] = [[] for _ in range(k)]
    seq_work = [cost.work(s, d) for s, d in zip(lengths, degrees)]
    order = sorted(range(len(lengths)), key=lambda i: (-seq_work[i], i))
    for i in order:
        s = lengths[i]
        fitting = [p for p in range(k) if tokens[p] + s <= room]
        pool = fitting or range(k)
        p = min(pool, key=lambda p: (work[p], tokens[p], p) if fitting else (tokens[p], p))
        parts[p].append(i)
        work[p] += seq_work[i]
        tokens[p] += s
    return [sorted(part, key=lambda i: (-lengths[i], i)) for part in parts if part]


def _assign_to_milp_groups(
    result: MilpResult, part: list[int], lengths: list[int], buckets_members: list[list[int]],
    cost: CostModel,
) -> Schedule:
    sizes = [d for d, _ in result.groups]
    quota = [dict(m) for _, m in result.groups]
    members: list[list[int]] = [[] for _ in sizes]
    loads = [cost.group_overhead(d) for d in sizes]
    tokens = [0] * len(sizes)
    for b, seqs in enumerate(buckets_members):
        for local in seqs:  # longest first within the bucket
            s = lengths[part[local]]
            cands = [g for g in range(len(sizes)) if quota[g].get(b, 0) > 0]
            g = min(cands, key=lambda g: (loads[g] + cost.seq_time(s, sizes[g]), g))
            quota[g][b] -= 1
            members[g].append(local)
            loads[g] += cost.seq_time(s, sizes[g])
            tokens[g] += s
    return Schedule(sizes, members, loads, tokens).compact()


def _bound_classes(lengths: list[int], max_buckets: int, exact_top: int, cost: CostModel) -> list[list[int]]:
    """Classes (lists of indices into ``lengths``) for the aggregated bound: each of the
    ``exact_top`` longest sequences alone, the rest in DP buckets (:mod:`bucketing`)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rest = order[exact_top:]
    buckets = bucket_lengths(
        [lengths[i] for i in rest], max_buckets, lambda s: cost.alpha1 * s * s + cost.alpha2 * s
    )
    return [[i] for i in order[:exact_top]] + [[rest[m] for m in b.members] for b in buckets]


def _schedule_micro_batch(
    part: list[int], lengths: list[int], degrees: list[int], cost: CostModel,
    options: PlannerOptions, budget_s: float, fallback: Schedule | None = None,
) -> tuple[Schedule, MicroBatch] | None:
    t0 = time.perf_counter()
    n_dev = cost.cluster.num_devices
    part_len = [lengths[i] for i in part]
    part_deg = [degrees[i] for i in part]
    if fallback is None or budget_s >= FULL_GREEDY_BUDGET_S:  # the fallback may be a quick greedy
        full = greedy_schedule(part_len, part_deg, cost)
        if fallback is None or (full is not None and full.makespan < fallback.makespan - 1e-12):
            fallback = full
    best, info = fallback, MicroBatch(groups=[], time_s=0.0, solver="greedy")
    lower = cost.comm_aware_lower_bound(part_len, part_deg)
    if options.solver != "greedy" and (budget_s >= MIN_BUDGET_S or best is None):
        # 1. Aggregated bound on the real lengths; its feasible probes give extra layouts.
        if best is not None:
            classes = _bound_classes(part_len, BOUND_BUCKETS, BOUND_EXACT_TOP, cost)
            agg = aggregate_lower_bound(
                [[part_len[i] for i in c] for c in classes], cost, lower, best.makespan,
                options.gap_rel / 2, BOUND_SHARE * budget_s,
            )
            lower = max(lower, agg.bound)
            tried: set[tuple[int, ...]] = set()
            for groups, _ in agg.layouts[:LAYOUTS_TRIED]:
                layout = [d for d in sorted(groups, reverse=True) for _ in range(groups[d])]
                layout += [1] * (n_dev - sum(layout))  # free devices: groups of one
                if tuple(layout) in tried:
                    continue
                tried.add(tuple(layout))
                cand = lpt_fill(layout, part_len, part_deg, cost)
                if cand is not None and cand.makespan < best.makespan - 1e-12:
                    best = cand.compact()
        # 2. The bucketed MILP, unless the schedule in hand is already within the gap.
        if best is None or best.makespan > lower * (1 + options.gap_rel):
            before = math.inf if best is None else best.makespan
            milp_budget = MILP_END * budget_s
            info, best = _run_milp(part, lengths, part_len, cost, options, milp_budget, t0, lower, best)
            # 3. The MILP found a better schedule: probe the bound again just below it.
            left = budget_s - (time.perf_counter() - t0)
            if best is not None and best.makespan < before - 1e-12 and left > 0.01:
                lower = max(lower, aggregate_lower_bound(
                    [[part_len[i] for i in c] for c in classes], cost, lower, best.makespan,
                    options.gap_rel / 2, left,
                ).bound)
    if best is None:
        return None
    info.lower_bound_s = min(lower, best.makespan)
    info.solve_time_s = time.perf_counter() - t0
    return best, info


def _run_milp(
    part: list[int], lengths: list[int], part_len: list[int], cost: CostModel,
    options: PlannerOptions, budget_s: float, t0: float, lower: float, best: Schedule | None,
) -> tuple[MicroBatch, Schedule | None]:
    """Bucket, warm-start and solve the MILP; return its info and the better schedule."""
    info = MicroBatch(groups=[], time_s=0.0, solver="greedy")
    buckets = bucket_lengths(
        part_len, options.max_buckets, lambda s: cost.alpha1 * s * s + cost.alpha2 * s
    )
    n_dev = cost.cluster.num_devices
    columns = len(buckets) * sum(min(n_dev // d, len(part_len)) for d in cost.group_sizes)
    if columns > MILP_MAX_COLUMNS and best is not None:
        return info, best  # too large to build and solve in the budget; keep the heuristics
    rep = [0] * len(part_len)
    for b, bucket in enumerate(buckets):
        for local in bucket.members:
            rep[local] = b
    b_deg = [cost.min_degree(bk.length) or cost.cluster.num_devices for bk in buckets]
    rep_len = [buckets[rep[i]].length for i in range(len(part_len))]
    rep_deg = [b_deg[rep[i]] for i in range(len(part_len))]
    # Warm start: the greedy on the representatives, or the best real-length schedule so far
    # counted per bucket when it still fits memory with the (longer) representatives;
    # whichever has the smaller bucketed makespan.
    warm = None
    warm_t = math.inf
    for sched in (greedy_schedule(rep_len, rep_deg, cost), best):
        if sched is None:
            continue
        groups = []
        for d, mem in zip(sched.sizes, sched.members):
            counts: dict[int, int] = {}
            for local in mem:
                counts[rep[local]] = counts.get(rep[local], 0) + 1
            groups.append((d, counts))
        if not all(
            cost.fits(sum(buckets[b].length * k for b, k in c.items()), d) for d, c in groups
        ):
            continue
        t = max(cost.group_overhead(d) + sum(cost.seq_time(buckets[b].length, d) * k for b, k in c.items())
                for d, c in groups)
        if t < warm_t:
            warm, warm_t = groups, t
    # The comm-aware bound of the representatives and the real-length bound are both valid
    # bounds on the bucketed MILP (representatives are bucket maxima).
    rep_lower = max(lower, cost.comm_aware_lower_bound(rep_len, rep_deg))
    remaining = budget_s - (time.perf_counter() - t0)
    result = solve_milp(
        buckets, b_deg, cost, max(0.02, remaining), options.gap_rel, warm, options.solver,
        lower_bound=rep_lower,
    )
    if not result.groups and options.solver == "highs" and result.status == "no-solution":
        remaining = budget_s - (time.perf_counter() - t0)
        if remaining > 0.2:  # CBC fallback only when there is time left for it
            result = solve_milp(buckets, b_deg, cost, remaining, options.gap_rel, warm, "cbc",
                                lower_bound=rep_lower)
    if result.groups:
        milp_sched = _assign_to_milp_groups(
            result, part, lengths, [list(b.members) for b in buckets], cost
        )
        obj = result.objective or 0.0
        bound = min(max(result.bound or 0.0, rep_lower), obj)
        info = MicroBatch(
            groups=[], time_s=0.0, solver=result.solver, mip_objective_s=obj,
            mip_bound_s=bound, mip_gap=(obj - bound) / obj if obj > 0 else 0.0,
        )
        if best is None or milp_sched.makespan <= best.makespan + 1e-12:
            best = milp_sched
        else:
            info.solver += "+greedy"  # MILP solved; a heuristic true-length schedule was better
    return info, best


def _choose_split(
    lengths: list[int], degrees: list[int], cost: CostModel, k_min: int, options: PlannerOptions,
) -> tuple[list[list[int]], dict[tuple[int, ...], Schedule]]:
    """The micro-batch split the greedy schedules fastest among the candidates below.

    Candidates, in this order: the balanced split into ``k_min`` parts, into fewer parts
    when only the ``memory_fill`` margin asked for ``k_min``, the first giant-first split of
    :mod:`dtrain.planner.split`, the balanced split into ``k_min + 1`` parts (more memory
    slack, shorter micro-batches), the other giant-first splits; then
    :func:`_move_long_sequences` improves the best one. Every step counts evaluations, not
    time, so the split does not depend on the machine's load.
    Returns the split and the greedy schedules computed (keyed by part; quick ones, with
    :data:`dtrain.planner.greedy.QUICK`) for reuse as warm starts.
    """
    cache: dict[tuple[int, ...], Schedule] = {}

    def total(parts: list[list[int]]) -> float:
        out = 0.0
        for part in parts:
            key = tuple(part)
            if key not in cache:
                sched = greedy_schedule([lengths[i] for i in part], [degrees[i] for i in part], cost, **QUICK)
                if sched is None:
                    return math.inf
                cache[key] = sched
            out += cache[key].makespan
        return out

    best = split_micro_batches(lengths, degrees, cost, k_min, options.memory_fill)
    if k_min >= len(lengths):
        return best, cache
    best_t = total(best)
    candidates: list[list[list[int]]] = []
    tight = math.ceil(sum(lengths) / (cost.cluster.num_devices * cost.tokens_per_device))
    if tight < k_min:  # the memory_fill margin alone asked for another micro-batch
        candidates.append(split_micro_batches(lengths, degrees, cost, tight, 1.0))
    if options.giant_splits:
        bt = BatchTimes(lengths, degrees, cost)
        giant = giant_first_splits(lengths, degrees, cost, bt, options.memory_fill)
        candidates += giant[:1]
        giant = giant[1:]
    else:
        giant = []
    candidates.append(split_micro_batches(lengths, degrees, cost, k_min + 1, options.memory_fill))
    candidates += giant
    ranked = [(best_t, 0, best)]
    for n, cand in enumerate(candidates, 1):  # all of them (a fixed count): every rank gets the same split
        ranked.append((total(cand), n, cand))
    ranked.sort(key=lambda r: (r[0], r[1]))
    best_t, _, best = ranked[0]
    if options.move_budget > 0 and best_t < math.inf:
        # The move search starts from the best MOVE_STARTS candidates (the budget shared).
        starts = [r for r in ranked[:MOVE_STARTS] if r[0] < math.inf]
        for _, _, cand in starts:
            moved = _move_long_sequences(cand, lengths, degrees, cost, options.move_budget // len(starts),
                                         options.memory_fill, total)
            t = total(moved)
            if t < best_t - 1e-12:
                best, best_t = moved, t
    return best, cache


def _move_long_sequences(
    parts: list[list[int]], lengths: list[int], degrees: list[int], cost: CostModel,
    budget: int, fill: float, total: Callable[[list[list[int]]], float],
) -> list[list[int]]:
    """First-improvement local search on the split: move one long sequence (one that needs
    more than one device) to another micro-batch with memory for it, kept when the quick
    greedy makes the two micro-batches faster; then swaps of two of them. At most ``budget`` evaluations
    (a count, not a time, so every rank computes the same plan)."""
    room = cost.cluster.num_devices * cost.tokens_per_device * fill
    parts = [list(p) for p in parts]
    key = lambda i: (-lengths[i], i)  # noqa: E731
    times = [total([p]) for p in parts]
    tokens = [sum(lengths[i] for i in p) for p in parts]
    where = {i: k for k, p in enumerate(parts) for i in p}
    movers = sorted((i for i in where if degrees[i] > 1), key=key)[:MOVE_CANDIDATES]
    evals, improved = 0, True
    while improved and evals < budget:
        improved = False
        for swaps in (False, True):  # all single moves first: they are cheaper per gain
            for i in movers:
                src = where[i]
                for dst in sorted(range(len(parts)), key=lambda k: (times[k], k)):
                    if dst == src:
                        continue
                    partners = [j for j in movers if where[j] == dst] if swaps else [None]
                    for j in partners:
                        delta = lengths[i] - (lengths[j] if j is not None else 0)
                        if tokens[dst] + delta > room or tokens[src] - delta > room:
                            continue
                        if evals >= budget:
                            return [p for p in parts if p]
                        evals += 1
                        new_src = sorted([k for k in parts[src] if k != i] + ([j] if j is not None else []), key=key)
                        new_dst = sorted([k for k in parts[dst] if k != j] + [i], key=key)
                        t_src = total([new_src]) if new_src else 0.0
                        t_dst = total([new_dst])
                        if t_src + t_dst < times[src] + times[dst] - 1e-9:
                            parts[src], parts[dst] = new_src, new_dst
                            times[src], times[dst] = t_src, t_dst
                            tokens[src] -= delta
                            tokens[dst] += delta
                            where[i] = dst
                            if j is not None:
                                where[j] = src
                            improved = True
                            break
                    if where[i] != src:
                        break
            if improved:
                break  # back to single moves
    return [p for p in parts if p]


def plan_step(
    lengths: list[int], cost: CostModel, options: PlannerOptions | None = None
) -> StepPlan:
    """Plan one batch; raises :class:`PlannerError` for unplannable input."""
    options = options or PlannerOptions()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    degrees = cost.check_batch(lengths)
    lengths = [int(s) for s in lengths]
    n_dev = cost.cluster.num_devices
    k = max(1, math.ceil(sum(lengths) / (n_dev * cost.tokens_per_device * options.memory_fill)))
    split, greedy_cache = _choose_split(lengths, degrees, cost, k, options)
    while True:
        parts = split if split is not None else split_micro_batches(
            lengths, degrees, cost, k, options.memory_fill
        )
        k = max(k, len(parts))
        split = None  # if a part cannot be scheduled, fall back to balanced splits, k + 1, ...
        scheduled = []
        for p, part in enumerate(parts):
            left = MICRO_BATCH_SHARE * options.time_limit_s - (time.perf_counter() - t0)
            budget = max(0.0, left / (len(parts) - p))  # < MIN_BUDGET_S: greedy only
            out = _schedule_micro_batch(
                part, lengths, degrees, cost, options, budget, greedy_cache.get(tuple(part))
            )
            if out is None:
                break
            scheduled.append((part, *out))
        if len(scheduled) == len(parts):
            break
        if k >= len(lengths):
            raise PlannerError(
                "no feasible plan even with one sequence per micro-batch; this is a planner "
                "bug for a batch whose sequences each fit, please report it"
            )
        k += 1

    micro_batches = []
    for part, sched, info in scheduled:
        groups = []
        placement = place_groups(sched.sizes, n_dev, cost.cluster.devices_per_node)
        order = sorted(range(len(sched.sizes)), key=lambda g: placement[g][0][0])
        for g in order:
            d = sched.sizes[g]
            seqs = sorted((part[local] for local in sched.members[g]), key=lambda i: (-lengths[i], i))
            toks = sum(lengths[i] for i in seqs)
            if not cost.fits(toks, d) or any(degrees[i] > d for i in seqs):
                raise AssertionError(f"planner produced a group of {d} holding {toks} tokens")
            ranks, crosses = placement[g]
            groups.append(GroupPlan(
                size=d, ranks=ranks, crosses_nodes=crosses, sequences=seqs,
                lengths=[lengths[i] for i in seqs],
                time_s=cost.group_overhead(d) + sum(cost.seq_time(lengths[i], d) for i in seqs),
                memory_bytes=cost.model_state_bytes + cost.activation_bytes(toks, d),
            ))
        info.groups = groups
        info.time_s = max(g.time_s for g in groups)
        micro_batches.append(info)
    step = sum(m.time_s for m in micro_batches)
    c = cost.cluster
    return StepPlan(
        num_devices=n_dev,
        devices_per_node=c.devices_per_node,
        model=cost.model.name,
        lengths=lengths,
        micro_batches=micro_batches,
        step_time_s=step,
        lower_bound_s=cost.ideal_lower_bound(lengths, degrees),
        comm_lower_bound_s=cost.comm_aware_lower_bound(lengths, degrees),
        solve_time_s=time.perf_counter() - t0,
        memory_limit_bytes=(c.memory_GiB - c.reserve_GiB) * 1024**3,
        options=asdict(options),
        solve_cpu_s=time.process_time() - cpu0,
    )
