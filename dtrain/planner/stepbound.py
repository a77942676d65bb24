"""A step-level lower bound that keeps micro-batches: every sequence finishes inside *its*
micro-batch, each micro-batch has its own memory, work and device budget, and the step is the
sum of the micro-batch times (the argument is in ``docs/flexsp-planner.md``).

The comm-aware bound of :mod:`dtrain.planner.cost` lets every sequence use the whole step
``S`` as its time limit, so a 256K-token sequence may run on 8 in-node devices for 49 s while
memory still forces two more micro-batches. Here the limit of a sequence is the time of the
micro-batch it is in.

Relaxation ``R`` (micro-batch *levels*). Fix times ``0 = tau_0 < tau_1 < ... < tau_L``
(``tau_{L+1} = inf``). A micro-batch of time ``T`` is at level ``l`` when
``tau_l <= T < tau_{l+1}``.

Variables
  ``n_l in Z_{>=0}``       micro-batches at level ``l``
  ``theta_l >= 0``         their total time
  ``x_{b,l,d} >= 0``       sequences of class ``b`` run at level ``l`` on groups of ``d``
                           devices; only when ``delta_b <= d`` and ``t_{b,d} < tau_{l+1}``;
                           integer for the classes of single long sequences

Objective: ``minimise sum_l theta_l``

Constraints, for every level ``l``
  (assign)  ``sum_{l,d} x_{b,l,d} = c_b``                                 for every class b
  (time)    ``tau_l n_l <= theta_l <= tau_{l+1} n_l``
  (work)    ``sum_{b,d} d t_{b,d} x_{b,l,d} <= N theta_l``
  (memory)  ``sum_{b,d} l_b x_{b,l,d} <= N C n_l``                        (C = tokens per device)
  (devices) ``sum_{b,d: t_{b,d} > tau_{l+1}/2} d x_{b,l,d} <= N n_l``

Validity: map a plan to ``R`` by counting its micro-batches per level, their times, and its
sequences per (class, level, size). A sequence on ``d`` devices in a micro-batch of time
``T < tau_{l+1}`` has ``t <= T``; a group's busy time is at most ``T`` and the groups use at
most ``N`` devices (work); they hold at most ``N C`` tokens (memory); a group holds at most one
sequence longer than ``T/2``, and ``t > tau_{l+1}/2`` implies ``t > T/2`` (devices). Summing
over a level's micro-batches gives each row. So the optimum of ``R`` is at most any plan's
step time, for any number of micro-batches. Each class is represented by its *shortest*
member (time, work, memory and minimum size under-estimated), which keeps the rows valid for
the real lengths. HiGHS's dual bound is used, so a solve stopped by its time limit still gives
a valid (weaker) bound; the result is never below the comm-aware bound.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from dtrain.planner.bucketing import bucket_lengths
from dtrain.planner.cost import CostModel
from dtrain.planner.milp import silence_highs_banner

try:  # highspy is an install requirement; keep the module importable without it.
    import highspy
except ImportError:  # pragma: no cover
    highspy = None

GRID_RATIO = 1.06  # ratio between neighbouring level times
GRID_LEVELS = 48  # at most this many levels (the grid widens when the range needs more)
EXACT_TOP = 32  # longest sequences kept as their own (integer) classes
SHORT_BUCKETS = 12  # DP buckets for the others


@dataclass
class StepBound:
    """Result of :func:`step_lower_bound`."""

    bound: float  # valid lower bound on any plan's step time (seconds)
    comm_bound: float  # the comm-aware bound it starts from
    relaxation: float | None  # HiGHS's dual bound on R (None: not solved)
    status: str  # "optimal", "time-limit", "skipped"
    levels: int
    time_s: float


def _classes(lengths: list[int], cost: CostModel, exact_top: int, buckets: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rest = order[exact_top:]
    out = [[i] for i in order[:exact_top]]
    if rest:
        b = bucket_lengths([lengths[i] for i in rest], buckets,
                           lambda s: cost.alpha1 * s * s + cost.alpha2 * s)
        out += [[rest[m] for m in bk.members] for bk in b]
    return out


def level_grid(lo: float, hi: float, ratio: float = GRID_RATIO, max_levels: int = GRID_LEVELS) -> list[float]:
    """``tau_1 < ... < tau_L``: geometric from ``lo`` to at least ``hi``."""
    lo = max(lo, 1e-9)
    need = max(1, math.ceil(math.log(max(hi / lo, 1.0 + 1e-12)) / math.log(ratio)))
    if need > max_levels - 1:
        ratio = (hi / lo) ** (1.0 / (max_levels - 1))
        need = max_levels - 1
    return [lo * ratio**k for k in range(need + 1)]


def step_lower_bound(
    lengths: list[int], cost: CostModel, upper: float | None = None, time_limit_s: float = 1.0,
    grid_ratio: float = GRID_RATIO, exact_top: int = EXACT_TOP, short_buckets: int = SHORT_BUCKETS,
    integral: bool = True,
) -> StepBound:
    """The bound of relaxation ``R`` (module docstring), never below the comm-aware bound.

    ``upper``: a known plan's step time (the grid spans up to it; default: four times the
    comm-aware bound; the top level is unbounded either way, so any value keeps validity).
    ``time_limit_s``: HiGHS's limit (its dual bound is used when it stops early).
    ``integral=False`` solves the LP relaxation instead (weaker, faster).
    """
    t0 = time.perf_counter()
    degrees = cost.check_batch(lengths)
    comm = cost.comm_aware_lower_bound(lengths, degrees)
    if highspy is None:
        return StepBound(comm, comm, None, "skipped", 0, time.perf_counter() - t0)
    n_dev = cost.cluster.num_devices
    classes = _classes([int(s) for s in lengths], cost, exact_top, short_buckets)
    rep = np.asarray([min(lengths[i] for i in c) for c in classes], dtype=np.float64)
    counts = [len(c) for c in classes]
    integer = [len(c) == 1 for c in classes]
    rep_deg = [cost.min_degree(int(s)) or n_dev for s in rep]
    sizes = cost.group_sizes
    times = {d: cost.seq_times(rep, d) for d in sizes}
    # Levels: from the shortest time a long class can have up to the upper bound.
    longest = max(min(times[d][b] for d in sizes if d >= rep_deg[b]) for b in range(len(rep)))
    hi = upper if upper is not None else 4.0 * comm
    taus = [0.0] + level_grid(min(longest, comm) / 8.0, max(hi, longest), grid_ratio)
    tops = taus[1:] + [math.inf]
    n_lvl = len(taus)
    tpd = cost.tokens_per_device

    # Columns: [n_l]*L, [theta_l]*L, then x.
    col_lo: list[float] = []
    col_hi: list[float] = []
    col_int: list[bool] = []
    obj: list[float] = []
    for _ in range(n_lvl):  # n_l
        col_lo.append(0.0)
        col_hi.append(float(len(lengths)))
        col_int.append(True)
        obj.append(0.0)
    for _ in range(n_lvl):  # theta_l
        col_lo.append(0.0)
        col_hi.append(math.inf)
        col_int.append(False)
        obj.append(1.0)
    xs: list[tuple[int, int, int]] = []  # (class, level, size) of the x columns, after n and theta
    first_x = len(col_lo)
    for b in range(len(rep)):
        for lvl in range(n_lvl):
            for d in sizes:
                if d >= rep_deg[b] and times[d][b] < tops[lvl]:
                    xs.append((b, lvl, d))
                    col_lo.append(0.0)
                    col_hi.append(float(counts[b]))
                    col_int.append(integer[b])
                    obj.append(0.0)
    rows_lo: list[float] = []
    rows_hi: list[float] = []
    starts: list[int] = []
    index: list[int] = []
    value: list[float] = []

    def row(lo: float, hi: float, entries: list[tuple[int, float]]) -> None:
        starts.append(len(index))
        for j, v in entries:
            index.append(j)
            value.append(v)
        rows_lo.append(lo)
        rows_hi.append(hi)

    by_class: list[list[tuple[int, float]]] = [[] for _ in rep]
    by_level: list[list[tuple[int, int, int]]] = [[] for _ in range(n_lvl)]
    for j, (b, lvl, d) in enumerate(xs):
        by_class[b].append((first_x + j, 1.0))
        by_level[lvl].append((first_x + j, b, d))
    for b in range(len(rep)):
        row(float(counts[b]), float(counts[b]), by_class[b])
    for lvl in range(n_lvl):
        n_col, th_col = lvl, n_lvl + lvl
        row(0.0, math.inf, [(th_col, 1.0), (n_col, -taus[lvl])])
        if math.isfinite(tops[lvl]):
            row(-math.inf, 0.0, [(th_col, 1.0), (n_col, -tops[lvl])])
        mine = by_level[lvl]
        if not mine:
            continue
        row(-math.inf, 0.0, [(j, d * float(times[d][b])) for j, b, d in mine] + [(th_col, -float(n_dev))])
        row(-math.inf, 0.0, [(j, float(rep[b])) for j, b, _ in mine] + [(n_col, -n_dev * tpd)])
        big = [(j, float(d)) for j, b, d in mine if times[d][b] > tops[lvl] / 2]
        if big:
            row(-math.inf, 0.0, big + [(n_col, -float(n_dev))])

    silence_highs_banner()
    h = highspy.Highs()
    for key, val in (("output_flag", False), ("threads", 1), ("random_seed", 0),
                     ("time_limit", max(1e-3, time_limit_s - (time.perf_counter() - t0))),
                     ("mip_rel_gap", 1e-4)):
        h.setOptionValue(key, val)
    n_col = len(col_lo)
    empty = np.zeros(0, dtype=np.int32)
    h.addCols(n_col, np.asarray(obj), np.asarray(col_lo), np.asarray(col_hi), 0, empty, empty, np.zeros(0))
    h.addRows(len(rows_lo), np.asarray(rows_lo), np.asarray(rows_hi), len(index),
              np.asarray(starts, dtype=np.int32), np.asarray(index, dtype=np.int32),
              np.asarray(value, dtype=np.float64))
    ints = np.flatnonzero(np.asarray(col_int) & integral).astype(np.int32)
    h.changeColsIntegrality(len(ints), ints, np.asarray([highspy.HighsVarType.kInteger] * len(ints)))
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
        raise AssertionError("step bound relaxation infeasible; it holds every plan, please report it")
    relax = float(info.mip_dual_bound) if len(ints) else float(info.objective_function_value)
    if not math.isfinite(relax):
        relax = None
    label = "optimal" if status == highspy.HighsModelStatus.kOptimal else "time-limit"
    bound = max(comm, relax) if relax is not None else comm
    return StepBound(bound, comm, relax, label, n_lvl, time.perf_counter() - t0)


LONGEST_GRID_RATIO = 1.02  # ratio between neighbouring cells of the longest micro-batch's time
LONGEST_BUCKETS = 24  # DP buckets for the sequences after the EXACT_TOP longest
LONGEST_CELL_S = 0.5  # HiGHS limit per cell (its dual bound is used when it stops early)


def longest_batch_bound(
    lengths: list[int], cost: CostModel, upper: float | None = None, time_limit_s: float = 30.0,
    grid_ratio: float = LONGEST_GRID_RATIO, exact_top: int = EXACT_TOP, buckets: int = LONGEST_BUCKETS,
    rel_tol: float = 0.005,
) -> StepBound:
    """A step bound from the micro-batch that holds the longest sequence, in whole groups.

    The argument (``docs/flexsp-planner.md``, "Third round"): suppose a plan has step
    ``S < G``. Let ``B*`` be its micro-batch holding the longest sequence, ``T*`` its time,
    and ``R = S - T*`` the time of all the other micro-batches together; take the cell
    ``tau_j <= T* < tau_{j+1}`` of a geometric grid that starts at the longest sequence's
    shortest time (``T* >= G`` already contradicts ``S < G``). Then

    * ``B*`` is one micro-batch of makespan ``<= tau_{j+1}``: its sequences satisfy the
      aggregated group-count rows of :mod:`dtrain.planner.aggregate` (integer groups per
      size; per-size time and memory; at most ``k`` long items per group) with the
      assignment rows relaxed to ``<=``, the longest sequence included;
    * a sequence outside ``B*`` finishes within ``R < G - tau_j``, so it costs at least
      ``v_i = min {d t(s_i, d) : t(s_i, d) <= G - tau_j}`` device-seconds, and a sequence
      with no such size ("forced") is in ``B*``;
    * the other micro-batches offer ``N R`` device-seconds, so
      ``S = T* + R >= tau_j + (V - sum_{i in B*} v_i) / N`` with ``V = sum_i v_i``.

    ``U_j``, HiGHS's dual bound on ``max sum_b vbar_b x_b`` over those rows (rows use each
    class's shortest member, ``vbar_b`` its largest ``v``: both relax), bounds the last sum.
    If ``tau_j + (V - U_j) / N >= G`` for every cell (or ``B*``'s rows are infeasible), no
    plan has ``S < G``. A bisection on ``G`` between the comm-aware bound and ``upper`` (a
    known plan's step) keeps the largest ``G`` proven; a cell whose solve stops on the time
    limit still uses a valid (weaker) dual bound. Never below the comm-aware bound.
    """
    from dtrain.planner.aggregate import max_absorbed  # noqa: PLC0415  (aggregate imports milp)

    t0 = time.perf_counter()
    lengths = [int(s) for s in lengths]
    degrees = cost.check_batch(lengths)
    comm = cost.comm_aware_lower_bound(lengths, degrees)
    if highspy is None:
        return StepBound(comm, comm, None, "skipped", 0, time.perf_counter() - t0)
    n_dev = cost.cluster.num_devices
    sizes_all = cost.group_sizes
    seq_t = np.stack([np.where(np.asarray(degrees) <= d, cost.seq_times(lengths, d), np.inf)
                      for d in sizes_all], axis=1)
    seq_w = seq_t * np.asarray(sizes_all, dtype=np.float64)[None, :]
    classes = _classes(lengths, cost, exact_top, buckets)  # class 0: the longest sequence
    rep = np.asarray([min(lengths[i] for i in c) for c in classes], dtype=np.float64)
    counts = np.asarray([len(c) for c in classes], dtype=np.int64)
    rep_deg = np.asarray([cost.min_degree(int(s)) or n_dev for s in rep])
    sizes = [d for d in sizes_all if d >= int(rep_deg.min())]
    times = {d: cost.seq_times(rep, d) for d in sizes}
    start = float(np.min(seq_t[classes[0][0]]))
    cheapest = seq_w.min(axis=1)

    def proves(goal: float) -> bool | None:
        """True: no plan has step < goal; False: a cell fails; None: out of time."""
        tau = start
        while tau < goal:
            left = time_limit_s - (time.perf_counter() - t0)
            if left <= 0:
                return None
            top = min(tau * grid_ratio, goal)
            limit = goal - tau
            v = np.where(seq_t <= limit, seq_w, np.inf).min(axis=1)
            impossible = ~np.isfinite(v)
            v = np.where(impossible, cheapest, v)  # any finite value: such a sequence is in B*
            forced = np.asarray([bool(impossible[c[0]]) and all(impossible[i] for i in c) for c in classes])
            value = np.asarray([0.0 if forced[b] else max(v[i] for i in c) for b, c in enumerate(classes)])
            total = float(sum(v[i] for b, c in enumerate(classes) if not forced[b] for i in c))
            for relax in (True, False):  # the LP first: when it proves the cell, no MILP
                absorbed = max_absorbed(rep, counts, rep_deg, cost, times, sizes, top, value,
                                        min(left, LONGEST_CELL_S), forced, relax)
                if absorbed == -math.inf or tau + (total - absorbed) / n_dev >= goal:
                    break
            else:
                return False
            tau = top
        return True

    lo, hi = comm, upper if upper is not None else 2.0 * comm
    status, probes = "optimal", 0
    while hi > lo * (1 + rel_tol):
        goal = 0.5 * (lo + hi)
        ok = proves(goal)
        probes += 1
        if ok is None:
            status = "time-limit"
            break
        if ok:
            lo = goal
        else:
            hi = goal
    return StepBound(lo, comm, lo, status, probes, time.perf_counter() - t0)
