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
  (time)     ``sum_b t_{b,d_g} n_{b,g} <= T``                          for every slot g
  (memory)   ``sum_b l_b n_{b,g} <= C_{d_g} u_g``                     for every slot g
             (per-device memory: activations of all sequences of the group, sharded over
             ``d_g`` devices, must fit next to the model states; also forces ``u_g = 1``
             whenever the slot runs anything)
  (devices)  ``sum_g d_g u_g <= N``
  (work cut) ``N T >= sum_g sum_b d_g t_{b,d_g} n_{b,g}``             (valid: used groups
             have load <= T and occupy at most N devices; tightens the LP bound)
  (symmetry) ``u_{d,k} >= u_{d,k+1}`` and ``load_{d,k} >= load_{d,k+1}`` for slots of equal size
  (bounds)   ``T >= max_b min_{d >= delta_b} t_{b,d}``; ``T <= T_warm`` when a warm start
             (greedy schedule on the bucket representatives) is given.
  (pruning)  with a warm start, ``n_{b,g}`` exists only if ``t_{b,d_g} <= T_warm``: one such
             sequence alone would exceed the warm makespan, so no better solution uses it.
             This removes variables and keeps the LP relaxation from spreading fractions of a
             long sequence over groups too small to run it in time.

Each sequence is placed only where ``d_g >= delta_b`` (its minimum SP size). HiGHS gets the
warm start as an initial MIP solution, a time limit and a relative gap; CBC is the fallback.
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
from dtrain.planner.cost import CostModel, power_of_two_sizes

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


def _silence_highs_banner() -> None:
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


class _WarmHiGHS(pulp.HiGHS):  # type: ignore[misc,valid-type]
    """pulp's in-process HiGHS interface, plus passing variable initial values as a MIP start."""

    def callSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 (pulp's name)
        values = [(v.index, v.varValue) for v in lp.variables() if v.varValue is not None]
        if values:
            idx = np.asarray([i for i, _ in values], dtype=np.int32)
            val = np.asarray([x for _, x in values], dtype=np.float64)
            lp.solverModel.setSolution(len(values), idx, val)
        lp.solverModel.run()


def solve_milp(
    buckets: list[Bucket],
    bucket_degrees: list[int],
    cost: CostModel,
    time_limit_s: float,
    gap_rel: float = 0.01,
    warm: list[tuple[int, dict[int, int]]] | None = None,
    solver: str = "highs",
) -> MilpResult:
    """Build and solve the formulation in the module docstring.

    ``warm`` is a feasible schedule as ``(size, {bucket: count})`` per group. ``solver`` is
    ``"highs"`` (default; falls back to CBC if HiGHS is unavailable) or ``"cbc"``.
    """
    start = time.perf_counter()
    n_dev = cost.cluster.num_devices
    lengths = [b.length for b in buckets]
    counts = [b.count for b in buckets]
    n_b = len(buckets)
    sizes = [d for d in power_of_two_sizes(n_dev) if d >= min(bucket_degrees)]
    tpd = cost.tokens_per_device
    t = {(b, d): cost.seq_time(lengths[b], d) for b in range(n_b) for d in sizes}
    cap = {d: math.floor(d * tpd) for d in sizes}

    prob = pulp.LpProblem("flexsp", pulp.LpMinimize)
    t_lower = max(min(t[b, d] for d in sizes if d >= bucket_degrees[b]) for b in range(n_b))
    warm_t = None
    if warm:
        warm_t = max(sum(t[b, d] * k for b, k in cnt.items()) for d, cnt in warm)
    t_upper = math.inf if warm_t is None else warm_t * (1 + 1e-9) + 1e-12
    makespan = prob.add_variable(
        "T", lowBound=t_lower, upBound=None if warm_t is None else warm_t * (1 + 1e-9) + 1e-12
    )
    prob += makespan

    slots: list[tuple[int, int]] = []
    use: dict[tuple[int, int], pulp.LpVariable] = {}
    cnt: dict[tuple[int, tuple[int, int]], pulp.LpVariable] = {}
    load_terms: dict[tuple[int, int], list[tuple[pulp.LpVariable, float]]] = {}
    per_bucket: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in range(n_b)]
    work_terms: list[tuple[pulp.LpVariable, float]] = [(makespan, float(n_dev))]
    Affine = pulp.LpAffineExpression
    for d in sizes:
        eligible = [b for b in range(n_b) if bucket_degrees[b] <= d and t[b, d] <= t_upper]
        n_slots = min(n_dev // d, sum(counts[b] for b in eligible))
        for k in range(n_slots):
            g = (d, k)
            slots.append(g)
            use[g] = prob.add_variable(f"u_{d}_{k}", 0, 1, cat=pulp.LpBinary)
            terms = []
            for b in eligible:
                ub = min(counts[b], cap[d] // lengths[b])
                if ub <= 0:
                    continue
                v = prob.add_variable(f"n_{b}_{d}_{k}", 0, ub, cat=pulp.LpInteger)
                cnt[b, g] = v
                terms.append((b, v))
                per_bucket[b].append((v, 1.0))
                work_terms.append((v, -d * t[b, d]))
            load_terms[g] = [(v, t[b, d]) for b, v in terms]
            prob += Affine(load_terms[g] + [(makespan, -1.0)]) <= 0, f"time_{d}_{k}"
            mem = [(v, float(lengths[b])) for b, v in terms] + [(use[g], -float(cap[d]))]
            prob += Affine(mem) <= 0, f"mem_{d}_{k}"
            if k > 0:
                prev = (d, k - 1)
                prob += Affine([(use[prev], 1.0), (use[g], -1.0)]) >= 0, f"sym_use_{d}_{k}"
                sym = load_terms[prev] + [(v, -c) for v, c in load_terms[g]]
                prob += Affine(sym) >= 0, f"sym_load_{d}_{k}"
    for b in range(n_b):
        prob += Affine(per_bucket[b]) == counts[b], f"assign_{b}"
    prob += Affine([(use[g], float(g[0])) for g in slots]) <= n_dev, "devices"
    prob += Affine(work_terms) >= 0, "work_cut"

    if warm:
        _set_warm_start(warm, t, use, cnt, makespan, warm_t)

    remaining = max(0.01, time_limit_s - (time.perf_counter() - start))
    use_highs = solver == "highs" and highspy is not None
    if use_highs:
        _silence_highs_banner()
        backend = _WarmHiGHS(
            msg=False, timeLimit=remaining, gapRel=gap_rel, threads=1, random_seed=0, presolve="off"
        )
        name = "milp-highs"
    else:
        with warnings.catch_warnings():  # pulp 3.3 deprecates PULP_CBC_CMD in favour of COIN_CMD
            warnings.simplefilter("ignore", DeprecationWarning)
            backend = pulp.PULP_CBC_CMD(
                msg=False, timeLimit=max(1, math.ceil(remaining)), gapRel=gap_rel, threads=1,
                warmStart=bool(warm),
            )
        name = "milp-cbc"
    try:
        prob.solve(backend)
    except pulp.PulpSolverError:
        return MilpResult("no-solution", name, None, None, time.perf_counter() - start)

    status, bound = _read_status(prob, use_highs)
    elapsed = time.perf_counter() - start
    if status in ("infeasible", "no-solution"):
        return MilpResult(status, name, None, None, elapsed)
    groups: list[tuple[int, dict[int, int]]] = []
    for g in slots:
        members = {}
        for b in range(n_b):
            v = cnt.get((b, g))
            if v is not None and v.varValue is not None and round(v.varValue) > 0:
                members[b] = int(round(v.varValue))
        if members:
            groups.append((g[0], members))
    objective = max(sum(t[b, d] * k for b, k in m.items()) for d, m in groups)
    if bound is None:
        bound = t_lower if status != "optimal" else objective
    return MilpResult(status, name, objective, min(bound, objective), elapsed, groups)


def _set_warm_start(
    warm: list[tuple[int, dict[int, int]]],
    t: dict[tuple[int, int], float],
    use: dict[tuple[int, int], pulp.LpVariable],
    cnt: dict[tuple[int, tuple[int, int]], pulp.LpVariable],
    makespan: pulp.LpVariable,
    warm_t: float | None,
) -> None:
    """Map a schedule onto slots (per size, heaviest group first, matching the symmetry rows)."""
    for v in list(use.values()) + list(cnt.values()):
        v.setInitialValue(0)
    by_size: dict[int, list[dict[int, int]]] = {}
    for d, members in warm:
        by_size.setdefault(d, []).append(members)
    for d, groups in by_size.items():
        groups.sort(key=lambda m: -sum(t[b, d] * k for b, k in m.items()))
        for k, members in enumerate(groups):
            if (d, k) not in use:
                return  # schedule does not map onto the slots; start without it
            use[(d, k)].setInitialValue(1)
            for b, n in members.items():
                if (b, (d, k)) not in cnt:
                    return
                cnt[b, (d, k)].setInitialValue(n)
    makespan.setInitialValue(warm_t)


def _read_status(prob: pulp.LpProblem, highs: bool) -> tuple[str, float | None]:
    """Translate the solver's status into ours and read the best bound where available."""
    if highs:
        model = prob.solverModel
        st = model.getModelStatus()
        info = model.getInfo()
        has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
        if st == highspy.HighsModelStatus.kOptimal:
            return "optimal", float(info.mip_dual_bound)
        if st in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
            return "infeasible", None
        if has_solution:
            bound = float(info.mip_dual_bound)
            return "feasible", bound if math.isfinite(bound) else None
        return "no-solution", None
    if prob.status == pulp.LpStatusInfeasible:
        return "infeasible", None
    if prob.sol_status == pulp.LpSolutionOptimal:
        return "optimal", None
    if prob.sol_status in (pulp.LpSolutionIntegerFeasible,) or (
        prob.status == pulp.LpStatusOptimal and makespan_value(prob) is not None
    ):
        return "feasible", None
    return "no-solution", None


def makespan_value(prob: pulp.LpProblem) -> float | None:
    return pulp.value(prob.objective)
