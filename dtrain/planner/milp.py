"""The FlexSP MILP for one micro-batch: choose SP groups and how many sequences of each bucket
each group runs, minimising the slowest group's time.

Data
  buckets ``b = 1..B`` with representative length ``l_b`` (the bucket maximum), count ``c_b``
  and minimum SP size ``delta_b`` (smallest power of two whose memory holds ``l_b``);
  candidate sizes ``D = {2^k : min_b delta_b <= 2^k <= N}``; for each ``d`` in ``D`` the slots
  ``g = (d, k)``, ``k = 0..K_d - 1`` with ``K_d = min(floor(N/d), sum_{b: delta_b <= d} c_b)``;
  ``t_{b,d}`` = modeled time of length ``l_b`` on ``d`` devices (:mod:`dtrain.planner.cost`);
  ``C_d = floor(d * M_avail / a_tok)`` = tokens a group of ``d`` devices can hold.

Variables
  ``u_g in {0, 1}``            slot ``g`` is used (its ``d_g`` devices form a group)
  ``n_{b,g} in Z_{>=0}``       sequences of bucket ``b`` run by slot ``g`` (only when
                               ``delta_b <= d_g``; bounded by ``min(c_b, floor(C_d / l_b))``)
  ``T >= 0``                   makespan (seconds)

Objective
  ``minimise T``

Constraints
  (assign)   ``sum_g n_{b,g} = c_b``                                  for every bucket b
  (time)     ``c_{d_g} u_g + sum_b t_{b,d_g} n_{b,g} <= T``            for every slot g
             (``c_d``: the cost model's fixed seconds of a group per micro-batch, 0 unless
             calibrated on a runtime: :meth:`CostModel.group_overhead`)
  (memory)   ``sum_b l_b n_{b,g} <= C_{d_g} u_g``                     for every slot g
             (per-device memory: activations of all sequences of the group, sharded over
             ``d_g`` devices, must fit next to the model states; also forces ``u_g = 1``
             whenever the slot runs anything)
  (devices)  ``sum_g d_g u_g <= N``
  (work cut) ``N T >= sum_g sum_b d_g t_{b,d_g} n_{b,g}``             (valid: used groups
             have load <= T and occupy at most N devices; tightens the LP bound)
  (symmetry) ``u_{d,k} >= u_{d,k+1}`` and ``load_{d,k} >= load_{d,k+1}`` for slots of equal size
  (bounds)   ``T >= max(max_b min_{d >= delta_b} t_{b,d}, LB)`` where ``LB`` is an optional
             valid bound passed in by the caller: the planner passes the larger of the
             comm-aware bound of the representatives (:meth:`CostModel.comm_aware_lower_bound`)
             and the aggregated bound of :mod:`dtrain.planner.aggregate` on the real lengths
             (valid here because representatives are bucket maxima: every bucketed schedule
             is a real-length schedule at least as slow). ``T <= T_warm`` when a warm start
             is given.
  (pruning)  with a warm start, ``n_{b,g}`` exists only if ``t_{b,d_g} <= T_warm``: one such
             sequence alone would exceed the warm makespan, so no better solution uses it.
             This removes variables and keeps the LP relaxation from spreading fractions of a
             long sequence over groups too small to run it in time.

Each sequence is placed only where ``d_g >= delta_b`` (its minimum SP size). The model is built
once as sparse arrays (:class:`_Model`) and passed to HiGHS directly (no pulp objects on the
default path: pulp's expression building was most of the old solve time), with the warm start
as an initial MIP solution, a time limit, a relative gap, one thread, presolve off. CBC (through
pulp, from the same arrays) is the fallback.

Relation to the aggregated model: the slot model is exact (it is checked against brute force);
the aggregated model of :mod:`dtrain.planner.aggregate` (integer *counts* of groups per size and
of sequences per size, with per-size time/memory rows and at-most-k-big-items rows) is a
relaxation, far smaller, used by bisection on ``T`` for the lower bound and for group layouts.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pulp

from dtrain.planner.bucketing import Bucket
from dtrain.planner.cost import CostModel

try:  # highspy is an install requirement; keep the module importable without it.
    import highspy
except ImportError:  # pragma: no cover
    highspy = None


@dataclass
class MilpResult:
    """Outcome of one MILP solve; ``groups`` is empty when no solution was found."""

    status: str  # "optimal", "feasible" (time/gap limit), "infeasible", "no-solution"
    solver: str  # "milp-highs" or "milp-cbc"
    objective: float | None
    bound: float | None
    solve_time_s: float
    groups: list[tuple[int, dict[int, int]]] = field(default_factory=list)  # (size, {bucket: n})

    @property
    def gap(self) -> float | None:
        if self.objective is None or self.bound is None:
            return None
        if self.objective <= 0:
            return 0.0
        return max(0.0, (self.objective - self.bound) / self.objective)


_BANNER_SILENCED = False


def silence_highs_banner() -> None:
    """HiGHS prints a copyright banner to fd 1 on the first ``Highs()`` of a process, before
    any option can turn output off; swallow it once so ``--json`` output stays clean."""
    global _BANNER_SILENCED
    if _BANNER_SILENCED or highspy is None:
        return
    _BANNER_SILENCED = True
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class _Model:
    """The MILP as arrays: columns (bounds, integrality, names) and rows in CSR form. Built
    once; handed to HiGHS directly (no pulp objects on the default path) or turned into a
    pulp problem for the CBC fallback."""

    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    integer: list[bool] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    row_lo: list[float] = field(default_factory=list)
    row_hi: list[float] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)

    def col(self, name: str, lo: float, hi: float, integer: bool) -> int:
        self.names.append(name)
        self.lower.append(lo)
        self.upper.append(hi)
        self.integer.append(integer)
        return len(self.names) - 1

    def row(self, entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        self.starts.append(len(self.index))
        for j, v in entries:
            self.index.append(j)
            self.value.append(v)
        self.row_lo.append(lo)
        self.row_hi.append(hi)

    def solve_highs(
        self, time_limit_s: float, gap_rel: float, start: list[float] | None
    ) -> tuple[str, float | None, list[float] | None]:
        """Minimise column 0 with HiGHS: (status, dual bound, column values)."""
        silence_highs_banner()
        h = highspy.Highs()
        for key, val in (("output_flag", False), ("threads", 1), ("random_seed", 0),
                         ("time_limit", max(1e-3, time_limit_s)), ("mip_rel_gap", gap_rel),
                         ("presolve", "off")):
            h.setOptionValue(key, val)
        n = len(self.names)
        obj = np.zeros(n)
        obj[0] = 1.0
        empty = np.zeros(0, dtype=np.int32)
        h.addCols(n, obj, np.asarray(self.lower), np.asarray(self.upper), 0, empty, empty, np.zeros(0))
        h.addRows(
            len(self.row_lo), np.asarray(self.row_lo), np.asarray(self.row_hi), len(self.index),
            np.asarray(self.starts, dtype=np.int32), np.asarray(self.index, dtype=np.int32),
            np.asarray(self.value, dtype=np.float64),
        )
        ints = np.flatnonzero(np.asarray(self.integer)).astype(np.int32)
        h.changeColsIntegrality(len(ints), ints, np.asarray([highspy.HighsVarType.kInteger] * len(ints)))
        if start is not None:
            h.setSolution(n, np.arange(n, dtype=np.int32), np.asarray(start, dtype=np.float64))
        h.run()
        st = h.getModelStatus()
        info = h.getInfo()
        if st in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
            return "infeasible", None, None
        if info.primal_solution_status != 2:  # kSolutionStatusFeasible
            return "no-solution", None, None
        bound = float(info.mip_dual_bound)
        values = list(h.getSolution().col_value)
        if st == highspy.HighsModelStatus.kOptimal:
            return "optimal", bound, values
        return "feasible", bound if math.isfinite(bound) else None, values

    def solve_cbc(
        self, time_limit_s: float, gap_rel: float, start: list[float] | None
    ) -> tuple[str, float | None, list[float] | None]:
        """The same model through pulp and CBC (fallback when HiGHS is unavailable or fails)."""
        prob = pulp.LpProblem("flexsp", pulp.LpMinimize)
        cols = [
            prob.add_variable(name, lo, None if math.isinf(hi) else hi,
                              cat=pulp.LpInteger if integer else pulp.LpContinuous)
            for name, lo, hi, integer in zip(self.names, self.lower, self.upper, self.integer)
        ]
        prob += cols[0]
        ends = self.starts[1:] + [len(self.index)]
        for r, (a, b) in enumerate(zip(self.starts, ends)):
            expr = pulp.LpAffineExpression([(cols[self.index[k]], self.value[k]) for k in range(a, b)])
            lo, hi = self.row_lo[r], self.row_hi[r]
            if lo == hi:
                prob += expr == lo, f"r{r}"
            else:
                if math.isfinite(hi):
                    prob += expr <= hi, f"r{r}_hi"
                if math.isfinite(lo):
                    prob += expr >= lo, f"r{r}_lo"
        if start is not None:
            for v, x in zip(cols, start):
                v.setInitialValue(x)
        with warnings.catch_warnings():  # pulp 3.3 deprecates PULP_CBC_CMD in favour of COIN_CMD
            warnings.simplefilter("ignore", DeprecationWarning)
            backend = pulp.PULP_CBC_CMD(
                msg=False, timeLimit=max(1, math.ceil(time_limit_s)), gapRel=gap_rel, threads=1,
                warmStart=start is not None,
            )
        try:
            prob.solve(backend)
        except pulp.PulpSolverError:
            return "no-solution", None, None
        if prob.status == pulp.LpStatusInfeasible:
            return "infeasible", None, None
        if prob.sol_status == pulp.LpSolutionOptimal:
            status = "optimal"
        elif prob.sol_status == pulp.LpSolutionIntegerFeasible or (
            prob.status == pulp.LpStatusOptimal and pulp.value(prob.objective) is not None
        ):
            status = "feasible"
        else:
            return "no-solution", None, None
        return status, None, [v.varValue or 0.0 for v in cols]


def solve_milp(
    buckets: list[Bucket],
    bucket_degrees: list[int],
    cost: CostModel,
    time_limit_s: float,
    gap_rel: float = 0.01,
    warm: list[tuple[int, dict[int, int]]] | None = None,
    solver: str = "highs",
    lower_bound: float | None = None,
) -> MilpResult:
    """Build and solve the formulation in the module docstring.

    ``warm`` is a feasible schedule as ``(size, {bucket: count})`` per group. ``solver`` is
    ``"highs"`` (default; falls back to CBC if HiGHS is unavailable) or ``"cbc"``.
    ``lower_bound`` is a known valid bound on the optimum (e.g. the aggregated bound of
    :mod:`dtrain.planner.aggregate`); it becomes the lower bound of ``T``.
    """
    start = time.perf_counter()
    n_dev = cost.cluster.num_devices
    lengths = [b.length for b in buckets]
    counts = [b.count for b in buckets]
    n_b = len(buckets)
    sizes = [d for d in cost.group_sizes if d >= min(bucket_degrees)]
    tpd = cost.tokens_per_device
    t = {(b, d): cost.seq_time(lengths[b], d) for b in range(n_b) for d in sizes}
    c = {d: cost.group_overhead(d) for d in sizes}
    cap = {d: math.floor(d * tpd) for d in sizes}

    t_lower = max(min(c[d] + t[b, d] for d in sizes if d >= bucket_degrees[b]) for b in range(n_b))
    warm_t = None
    if warm:
        warm_t = max(c[d] + sum(t[b, d] * k for b, k in cnt.items()) for d, cnt in warm)
    if lower_bound is not None:
        t_lower = max(t_lower, lower_bound if warm_t is None else min(lower_bound, warm_t))
    t_upper = math.inf if warm_t is None else warm_t * (1 + 1e-9) + 1e-12

    m = _Model()
    makespan = m.col("T", t_lower, t_upper, False)
    slots: list[tuple[int, int]] = []
    use: dict[tuple[int, int], int] = {}
    cnt: dict[tuple[int, tuple[int, int]], int] = {}
    per_bucket: list[list[tuple[int, float]]] = [[] for _ in range(n_b)]
    work_terms: list[tuple[int, float]] = [(makespan, float(n_dev))]
    prev_load: list[tuple[int, float]] = []
    for d in sizes:
        eligible = [b for b in range(n_b) if bucket_degrees[b] <= d and c[d] + t[b, d] <= t_upper]
        n_slots = min(n_dev // d, sum(counts[b] for b in eligible))
        for k in range(n_slots):
            g = (d, k)
            slots.append(g)
            use[g] = m.col(f"u_{d}_{k}", 0.0, 1.0, True)
            load: list[tuple[int, float]] = []
            mem: list[tuple[int, float]] = []
            for b in eligible:
                ub = min(counts[b], cap[d] // lengths[b])
                if ub <= 0:
                    continue
                v = m.col(f"n_{b}_{d}_{k}", 0.0, float(ub), True)
                cnt[b, g] = v
                per_bucket[b].append((v, 1.0))
                work_terms.append((v, -d * t[b, d]))
                load.append((v, t[b, d]))
                mem.append((v, float(lengths[b])))
            fixed = [(use[g], c[d])] if c[d] > 0 else []
            if fixed:
                work_terms.append((use[g], -d * c[d]))
            m.row(load + fixed + [(makespan, -1.0)], -math.inf, 0.0)  # (time)
            m.row(mem + [(use[g], -float(cap[d]))], -math.inf, 0.0)  # (memory)
            if k > 0:  # (symmetry)
                m.row([(use[(d, k - 1)], 1.0), (use[g], -1.0)], 0.0, math.inf)
                m.row(prev_load + [(v, -c) for v, c in load], 0.0, math.inf)
            prev_load = load
    for b in range(n_b):
        m.row(per_bucket[b], float(counts[b]), float(counts[b]))  # (assign)
    m.row([(use[g], float(g[0])) for g in slots], -math.inf, float(n_dev))  # (devices)
    m.row(work_terms, 0.0, math.inf)  # (work cut)

    initial = _warm_vector(warm, t, use, cnt, len(m.names), warm_t) if warm else None
    remaining = max(0.01, time_limit_s - (time.perf_counter() - start))
    if solver == "highs" and highspy is not None:
        name = "milp-highs"
        status, bound, values = m.solve_highs(remaining, gap_rel, initial)
    else:
        name = "milp-cbc"
        status, bound, values = m.solve_cbc(remaining, gap_rel, initial)
    elapsed = time.perf_counter() - start
    if values is None or status in ("infeasible", "no-solution"):
        return MilpResult(status, name, None, None, elapsed)
    groups: list[tuple[int, dict[int, int]]] = []
    for g in slots:
        members = {}
        for b in range(n_b):
            v = cnt.get((b, g))
            if v is not None and round(values[v]) > 0:
                members[b] = int(round(values[v]))
        if members:
            groups.append((g[0], members))
    objective = max(c[d] + sum(t[b, d] * k for b, k in mem_.items()) for d, mem_ in groups)
    if bound is None:
        bound = t_lower if status != "optimal" else objective
    return MilpResult(status, name, objective, min(max(bound, t_lower), objective), elapsed, groups)


def _warm_vector(
    warm: list[tuple[int, dict[int, int]]],
    t: dict[tuple[int, int], float],
    use: dict[tuple[int, int], int],
    cnt: dict[tuple[int, tuple[int, int]], int],
    n_cols: int,
    warm_t: float | None,
) -> list[float] | None:
    """Map a schedule onto slots (per size, heaviest group first, matching the symmetry rows);
    None when it does not map (the solver then starts without it)."""
    x = [0.0] * n_cols
    by_size: dict[int, list[dict[int, int]]] = {}
    for d, members in warm:
        by_size.setdefault(d, []).append(members)
    for d, groups in by_size.items():
        groups.sort(key=lambda m: -sum(t[b, d] * k for b, k in m.items()))
        for k, members in enumerate(groups):
            if (d, k) not in use:
                return None
            x[use[(d, k)]] = 1.0
            for b, n in members.items():
                if (b, (d, k)) not in cnt:
                    return None
                x[cnt[b, (d, k)]] = float(n)
    x[0] = warm_t or 0.0
    return x
