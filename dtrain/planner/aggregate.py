"""Aggregated (group-count) relaxation of one micro-batch: a strong lower bound by bisection
on the makespan, and group layouts for the primal heuristics.

Data: classes ``b = 1..B`` of ``c_b`` sequences, each of length at least ``l_b`` (so at least
the time ``t_{b,d} = t(l_b, d)`` on ``d`` devices and minimum SP size ``delta_b``), candidate
power-of-two sizes ``D``, ``C_d = floor(d * M_avail / a_tok)`` tokens per group of ``d``.

For a *fixed* makespan ``T`` the feasibility model ``A(T)`` is linear:

Variables
  ``y_d in Z_{>=0}``       number of groups of size ``d``
  ``x_{b,d} in Z_{>=0}``   sequences of class ``b`` run on groups of size ``d``; only when
                           ``delta_b <= d`` and ``t_{b,d} <= T`` (one sequence alone would
                           exceed ``T`` otherwise)

Objective: ``minimise sum_d d y_d`` (devices used; feasibility is ``<= N``)

Constraints
  (assign)  ``sum_d x_{b,d} = c_b``                                       for every b
  (devices) ``sum_d d y_d <= N``
  (time)    ``sum_b t_{b,d} x_{b,d} <= T y_d``                            for every d
  (memory)  ``sum_b l_b x_{b,d} <= C_d y_d``                              for every d
  (big-k)   ``sum_{b: t_{b,d} > T/(k+1)} x_{b,d} <= k y_d``               k = 1, 2, 3, every d
  (mem-k)   ``sum_{b: l_b > C_d/(k+1)} x_{b,d} <= k y_d``                 k = 1, 2, 3, every d

Validity: any schedule with makespan ``<= T`` gives a solution (``y_d`` = its groups of size
``d``, ``x_{b,d}`` = its class-b sequences on them): (time) and (memory) are the per-group
rows summed over the groups of one size; a group of load ``<= T`` holds at most ``k``
sequences longer than ``T/(k+1)`` (big-k), likewise for tokens (mem-k). Summing (time) with
weights ``d`` gives the work bound ``N T >= sum d t_{b,d} x_{b,d}``, so ``A(T)`` implies the
comm-aware bound of :mod:`dtrain.planner.cost`; integrality of ``y_d`` and the memory rows
add to it. Feasibility is monotone in ``T`` (larger ``T`` only relaxes every row), so the
smallest feasible ``T`` found by bisection is a lower bound on the micro-batch's optimum when
every probe below it was *proven* infeasible; a probe that times out counts as feasible, so
the bound stays valid.

Classes: the caller partitions the sequences; each class is represented by its *shortest*
member (length, time, minimum SP size all under-estimated), so the bound holds for the real
lengths (and hence for the bucketed MILP of :mod:`dtrain.planner.milp`, whose representatives
are bucket maxima). The planner keeps the 32 longest sequences as singleton classes (they
decide which sizes are possible within ``T``) and DP-buckets the rest into 24 classes.

The probes' solutions (group counts ``y_d``) are also returned as group layouts: the planner
fills each with the real sequences by LPT (:func:`dtrain.planner.greedy.lpt_fill`) as extra
primal candidates.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from dtrain.planner.cost import CostModel
from dtrain.planner.milp import silence_highs_banner

try:  # highspy is an install requirement; keep the module importable without it.
    import highspy
except ImportError:  # pragma: no cover
    highspy = None

BIG_K = (1, 2, 3)
PROBE_SHARE_DIV = 2  # a probe gets at most half of the bound's time budget


@dataclass
class AggregateBound:
    """Result of :func:`aggregate_lower_bound`."""

    bound: float  # valid lower bound on the makespan (seconds)
    # Solutions of feasible probes, smallest T first: ``({d: y_d}, {(b, d): x_bd})``.
    layouts: list[tuple[dict[int, int], dict[tuple[int, int], int]]] = field(default_factory=list)
    probes: int = 0
    time_s: float = 0.0


def _model(
    lengths: np.ndarray, counts: np.ndarray, degrees: np.ndarray, cost: CostModel,
    times: dict[int, np.ndarray], sizes: list[int], makespan: float, subset: bool = False,
    forced: np.ndarray | None = None,
) -> tuple["highspy.Highs", list[tuple[int, int]]] | None:
    """HiGHS model of ``A(makespan)`` (module docstring; objective: devices used) and its x
    columns ``(b, d)`` after the ``y`` columns; None when a class has no column. With
    ``subset`` the classes after the first need not be assigned (``sum_d x_{b,d} <= c_b``;
    the first, the caller's longest sequence, still must be): the micro-batches of
    :func:`dtrain.planner.stepbound.longest_batch_bound`."""
    n_dev = cost.cluster.num_devices
    tpd = cost.tokens_per_device
    n_b = len(lengths)
    cols: list[tuple[int, int]] = []  # (b, d) of the x columns, after the y columns
    for d in sizes:
        for b in range(n_b):
            if degrees[b] <= d and times[d][b] <= makespan:
                cols.append((b, d))
    covered = np.zeros(n_b, dtype=bool)
    for b, _ in cols:
        covered[b] = True
    must = np.ones(n_b, dtype=bool) if not subset else (
        np.zeros(n_b, dtype=bool) if forced is None else np.asarray(forced, dtype=bool).copy())
    must[0] = True
    if not covered[must].all():
        return None
    n_y = len(sizes)
    y_of = {d: k for k, d in enumerate(sizes)}
    n_int = n_col = n_y + len(cols)
    cost_vec = np.zeros(n_col)
    cost_vec[:n_y] = sizes
    lower = np.zeros(n_col)
    upper = np.empty(n_col)
    upper[:n_y] = [n_dev // d for d in sizes]
    cap = {d: math.floor(d * tpd) for d in sizes}
    for j, (b, d) in enumerate(cols):
        upper[n_y + j] = float(counts[b])
    rows_lo: list[float] = []
    rows_hi: list[float] = []
    starts: list[int] = []
    index: list[int] = []
    value: list[float] = []

    def add_row(lo: float, hi: float, entries: list[tuple[int, float]]) -> None:
        starts.append(len(index))
        for i, v in entries:
            index.append(i)
            value.append(v)
        rows_lo.append(lo)
        rows_hi.append(hi)

    add_row(-math.inf, float(n_dev), [(k, float(d)) for k, d in enumerate(sizes)])
    for b in range(n_b):
        entries = [(n_y + j, 1.0) for j, (bb, _) in enumerate(cols) if bb == b]
        if entries:
            add_row(float(counts[b]) if must[b] else 0.0, float(counts[b]), entries)
    for d in sizes:
        mine = [(n_y + j, b) for j, (b, dd) in enumerate(cols) if dd == d]
        if not mine:
            continue
        y = y_of[d]
        add_row(-math.inf, 0.0, [(j, float(times[d][b])) for j, b in mine] + [(y, -makespan)])
        add_row(-math.inf, 0.0, [(j, float(lengths[b])) for j, b in mine] + [(y, -float(cap[d]))])
        for k in BIG_K:
            big = [(j, 1.0) for j, b in mine if times[d][b] > makespan / (k + 1)]
            if big:
                add_row(-math.inf, 0.0, big + [(y, -float(k))])
            big = [(j, 1.0) for j, b in mine if lengths[b] > cap[d] / (k + 1)]
            if big:
                add_row(-math.inf, 0.0, big + [(y, -float(k))])

    silence_highs_banner()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("random_seed", 0)
    empty = np.zeros(0, dtype=np.int32)
    h.addCols(n_col, cost_vec, lower, upper, 0, empty, empty, np.zeros(0))
    h.addRows(
        len(rows_lo), np.asarray(rows_lo), np.asarray(rows_hi), len(index),
        np.asarray(starts, dtype=np.int32), np.asarray(index, dtype=np.int32),
        np.asarray(value, dtype=np.float64),
    )
    h.changeColsIntegrality(
        n_int, np.arange(n_int, dtype=np.int32),
        np.asarray([highspy.HighsVarType.kInteger] * n_int),
    )
    return h, cols


def _feasible(
    lengths: np.ndarray, counts: np.ndarray, degrees: np.ndarray, cost: CostModel,
    times: dict[int, np.ndarray], sizes: list[int], makespan: float, time_limit_s: float,
) -> tuple[bool | None, tuple[dict[int, int], dict[tuple[int, int], int]] | None]:
    """Solve ``A(makespan)``: (True, (y, x)), (False, None), or (None, None) when undecided.

    ``lengths[b]`` / ``counts[b]``: shortest length and size of class ``b``; ``times[d][b]``:
    the time of ``lengths[b]`` on ``d`` devices."""
    built = _model(lengths, counts, degrees, cost, times, sizes, makespan)
    if built is None:
        return False, None
    h, cols = built
    n_y = len(sizes)
    n_int = n_y + len(cols)
    h.setOptionValue("time_limit", max(1e-3, time_limit_s))
    h.setOptionValue("mip_rel_gap", 1.0)  # feasibility is all that is asked
    h.run()
    status = h.getModelStatus()
    if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
        return False, None
    if h.getInfo().primal_solution_status == 2:
        val = np.rint(np.asarray(h.getSolution().col_value[:n_int])).astype(int)
        y = {d: int(val[k]) for k, d in enumerate(sizes) if val[k] > 0}
        x = {col: int(val[n_y + j]) for j, col in enumerate(cols) if val[n_y + j] > 0}
        return True, (y, x)
    return None, None


def max_absorbed(
    lengths: np.ndarray, counts: np.ndarray, degrees: np.ndarray, cost: CostModel,
    times: dict[int, np.ndarray], sizes: list[int], makespan: float, value: np.ndarray,
    time_limit_s: float, forced: np.ndarray | None = None, relax: bool = False,
) -> float:
    """Upper bound on ``sum_b value[b] x_b`` over the sub-batches (class 0 and the classes
    with ``forced[b]`` included whole) that one micro-batch of time ``<= makespan`` can run,
    i.e. over ``A(makespan)`` with ``<=`` assignment rows; ``-inf`` when that is
    infeasible. HiGHS's dual bound, so a solve stopped by its time limit still gives a valid
    (larger) number. ``relax``: the LP relaxation's optimum (larger still, much faster)."""
    built = _model(lengths, counts, degrees, cost, times, sizes, makespan, subset=True, forced=forced)
    if built is None:
        return -math.inf
    h, cols = built
    n_y = len(sizes)
    if relax:
        n = n_y + len(cols)
        h.changeColsIntegrality(n, np.arange(n, dtype=np.int32),
                                np.asarray([highspy.HighsVarType.kContinuous] * n))
    h.changeColsCost(n_y + len(cols), np.arange(n_y + len(cols), dtype=np.int32),
                     np.concatenate([np.zeros(n_y), [float(value[b]) for b, _ in cols]]))
    h.changeObjectiveSense(highspy.ObjSense.kMaximize)
    h.setOptionValue("time_limit", max(1e-3, time_limit_s))
    h.setOptionValue("mip_rel_gap", 1e-3)
    h.run()
    status = h.getModelStatus()
    if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
        return -math.inf
    info = h.getInfo()
    if relax:
        if status != highspy.HighsModelStatus.kOptimal:
            return float(np.dot(value, counts))
        return float(info.objective_function_value)
    bound = float(info.mip_dual_bound)
    return bound if math.isfinite(bound) else float(np.dot(value, counts))


def aggregate_lower_bound(
    classes: list[list[int]], cost: CostModel, lower: float, upper: float, rel_tol: float,
    time_limit_s: float,
) -> AggregateBound:
    """Smallest ``T`` in ``[lower, upper]`` where ``A(T)`` is not proven infeasible, up to ``rel_tol``.

    ``classes`` partitions the sequence lengths (each class non-empty). ``lower`` must be a
    valid bound already (e.g. the comm-aware bound) and ``upper`` the makespan of a known
    schedule. Stops early when the time budget is spent (the bound proven so far is
    returned). Needs highspy; without it returns ``lower``.
    """
    t0 = time.perf_counter()
    out = AggregateBound(bound=lower)
    if highspy is None or upper <= lower * (1 + rel_tol):
        return out
    n_dev = cost.cluster.num_devices
    lengths = np.asarray([min(c) for c in classes], dtype=np.float64)
    counts = np.asarray([len(c) for c in classes], dtype=np.int64)
    degrees = np.asarray([cost.min_degree(int(s)) or n_dev for s in lengths])
    sizes = [d for d in cost.group_sizes if d >= int(degrees.min())]
    times = {d: cost.seq_times(lengths, d) for d in sizes}
    lo, hi = lower, upper
    # First probe just below the incumbent's target gap: if infeasible, one solve proves it.
    probe = upper / (1 + rel_tol)
    while hi > lo * (1 + rel_tol):
        left = time_limit_s - (time.perf_counter() - t0)
        if left <= 0.005:
            break
        # One probe may not eat the whole budget: an undecided probe proves nothing.
        limit = min(left, time_limit_s / PROBE_SHARE_DIV)
        ok, layout = _feasible(lengths, counts, degrees, cost, times, sizes, probe, limit)
        out.probes += 1
        if ok is False:
            lo = probe
        else:
            hi = probe
            if layout is not None:
                out.layouts.insert(0, layout)
        probe = math.sqrt(lo * hi) if hi > lo * (1 + rel_tol) else hi
    out.bound = lo
    out.time_s = time.perf_counter() - t0
    return out
