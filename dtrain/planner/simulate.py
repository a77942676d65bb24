"""Baselines and workloads: static (Ulysses) SP degrees, length distributions, plan comparison.

Execution model shared by every plan (FlexSP and static): a step is a sequence of
micro-batches; inside a micro-batch all groups run concurrently and the micro-batch ends
when its slowest group ends (ZeRO-3 parameter gathers and the regrouping between
micro-batches synchronise all devices); step time = sum of micro-batch times.

Static SP of degree ``d``: ``N/d`` groups of ``d`` devices; the batch is split into the
fewest micro-batches whose sequences fit or one more, whichever is faster (the same
balanced split and the same choice FlexSP gets), and each
micro-batch's sequences are balanced over the groups by LPT. A degree is infeasible when a
sequence needs more than ``d`` devices of memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dtrain.planner.cost import CostModel
from dtrain.planner.errors import PlannerError
from dtrain.planner.greedy import lpt_fill
from dtrain.planner.plan import StepPlan
from dtrain.planner.solve import PlannerOptions, plan_step, split_micro_batches

DISTRIBUTIONS = ("lognormal", "longtail-mix", "uniform", "chat-doc-giant")


def sample_lengths(dist: str, batch: int, seed: int = 0) -> list[int]:
    """Draw ``batch`` sequence lengths (deterministic for a seed).

    * ``lognormal``: median 2048, sigma 1.5, clipped to [64, 131072] (long-tail corpus mix);
    * ``longtail-mix``: lognormal (median 2048, sigma 1.0, clipped to [64, 32768]) with each
      sequence replaced, with probability 1%, by a log-uniform length in [65536, 262144]
      (at least one such sequence per batch);
    * ``uniform``: uniform integers in [256, 16384];
    * ``chat-doc-giant``: each sequence, independently, a chat turn (70%: lognormal, median
      700, sigma 0.5, clipped to [32, 4096]), a document (27%: lognormal, median 8192, sigma
      0.4, clipped to [2048, 32768]) or a giant (3%: log-uniform in [65536, 262144]).
    """
    if batch <= 0:
        raise PlannerError(f"--batch must be positive, got {batch}")
    rng = np.random.default_rng(seed)
    if dist == "lognormal":
        x = rng.lognormal(math.log(2048), 1.5, batch).clip(64, 131072)
    elif dist == "longtail-mix":
        x = rng.lognormal(math.log(2048), 1.0, batch).clip(64, 32768)
        long = rng.random(batch) < 0.01
        if not long.any():
            long[rng.integers(batch)] = True
        x[long] = np.exp(rng.uniform(math.log(65536), math.log(262144), int(long.sum())))
    elif dist == "uniform":
        x = rng.integers(256, 16385, batch)
    elif dist == "chat-doc-giant":
        kind = rng.choice(3, size=batch, p=[0.70, 0.27, 0.03])
        chat = rng.lognormal(math.log(700), 0.5, batch).clip(32, 4096)
        doc = rng.lognormal(math.log(8192), 0.4, batch).clip(2048, 32768)
        giant = np.exp(rng.uniform(math.log(65536), math.log(262144), batch))
        x = np.where(kind == 0, chat, np.where(kind == 1, doc, giant))
    else:
        raise PlannerError(f"unknown distribution {dist!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    return [int(v) for v in x]


@dataclass
class StaticResult:
    """Modeled step of static SP degree ``degree`` (``step_time_s`` None when infeasible)."""

    degree: int
    step_time_s: float | None
    micro_batches: int = 0
    reason: str = ""


def static_sp(lengths: list[int], cost: CostModel, degree: int, fill: float = 0.95) -> StaticResult:
    """Modeled step time of Ulysses with every group of size ``degree`` (module docstring)."""
    degrees = cost.check_batch(lengths)
    n = cost.cluster.num_devices
    if max(degrees) > degree:
        i = max(range(len(lengths)), key=lambda i: (degrees[i], lengths[i]))
        return StaticResult(
            degree, None,
            reason=f"sequence of {lengths[i]} tokens needs >= {degrees[i]} devices of memory",
        )
    k = max(1, math.ceil(sum(lengths) / (n * cost.tokens_per_device * fill)))
    best: StaticResult | None = None
    while k <= len(lengths):
        parts = split_micro_batches(lengths, degrees, cost, k, fill)
        total = 0.0
        for part in parts:
            sched = lpt_fill([degree] * (n // degree), [lengths[i] for i in part],
                             [degrees[i] for i in part], cost)
            if sched is None:
                total = math.inf
                break
            total += sched.makespan
        if total < math.inf:
            if best is None or total < best.step_time_s:  # type: ignore[operator]
                best = StaticResult(degree, total, len(parts))
            if len(parts) > best.micro_batches:  # tried the first feasible K and the next one
                return best
        k += 1
    if best is not None:
        return best
    return StaticResult(degree, None, reason="no micro-batch split fits memory")


@dataclass
class Comparison:
    """FlexSP plan next to every static SP degree and the ideal lower bound."""

    plan: StepPlan
    statics: list[StaticResult] = field(default_factory=list)

    @property
    def best_static(self) -> StaticResult | None:
        ok = [s for s in self.statics if s.step_time_s is not None]
        return min(ok, key=lambda s: (s.step_time_s, s.degree)) if ok else None

    def to_dict(self) -> dict[str, object]:
        best = self.best_static
        return {
            "flexsp_step_s": self.plan.step_time_s,
            "lower_bound_s": self.plan.lower_bound_s,
            "best_static_degree": best.degree if best else None,
            "best_static_step_s": best.step_time_s if best else None,
            "speedup_vs_best_static": (best.step_time_s / self.plan.step_time_s) if best else None,
            "ratio_to_lower_bound": self.plan.step_time_s / self.plan.lower_bound_s,
            "comm_lower_bound_s": self.plan.comm_lower_bound_s,
            "ratio_to_comm_lower_bound": self.plan.step_time_s / self.plan.comm_lower_bound_s,
            "solve_time_s": self.plan.solve_time_s,
            "solve_cpu_s": self.plan.solve_cpu_s,
            "mip_gap": self.plan.mip_gap,
            "plan_gap": self.plan.plan_gap,
            "plan_lower_bound_s": sum(m.lower_bound_s or 0.0 for m in self.plan.micro_batches),
            "lower_bound_gap": self.plan.lower_bound_gap,
            "solvers": self.plan.solvers,
            "micro_batches": len(self.plan.micro_batches),
            "static": {
                str(s.degree): {"step_s": s.step_time_s, "micro_batches": s.micro_batches,
                                "skipped": s.reason or None}
                for s in self.statics
            },
        }


def compare(lengths: list[int], cost: CostModel, options: PlannerOptions | None = None) -> Comparison:
    """Plan with FlexSP and evaluate every static degree on the same batch."""
    options = options or PlannerOptions()
    plan = plan_step(lengths, cost, options)
    statics = [
        static_sp(lengths, cost, d, options.memory_fill)
        for d in cost.group_sizes
    ]
    return Comparison(plan, statics)


def format_summary(cmp: Comparison, show_groups: int = 8) -> str:
    """Human-readable plan summary and comparison (what `dtrain plan seqpar` prints)."""
    p = cmp.plan
    lines = [
        f"FlexSP plan: {len(p.lengths)} sequences ({sum(p.lengths)} tokens, max {max(p.lengths)}) "
        f"on {p.num_devices} devices ({p.num_devices // p.devices_per_node} nodes x "
        f"{p.devices_per_node}), model {p.model}",
    ]
    for k, mb in enumerate(p.micro_batches):
        sizes: dict[int, int] = {}
        for g in mb.groups:
            sizes[g.size] = sizes.get(g.size, 0) + 1
        layout = " + ".join(f"{n}x{d}" for d, n in sorted(sizes.items(), reverse=True))
        gap = "n/a" if mb.mip_gap is None else f"{100 * mb.mip_gap:.2f}%"
        lines.append(
            f"  micro-batch {k}: {sum(len(g.sequences) for g in mb.groups)} seqs, groups {layout}, "
            f"time {mb.time_s:.3f} s, solver {mb.solver}, MILP gap {gap}"
        )
        for g in sorted(mb.groups, key=lambda g: -g.size)[:show_groups]:
            cross = " (crosses nodes)" if g.crosses_nodes else ""
            lines.append(
                f"    ranks {g.ranks[0]}-{g.ranks[-1]}{cross}: {len(g.sequences)} seqs, "
                f"longest {max(g.lengths)}, {g.time_s:.3f} s, {g.memory_bytes / 1024**3:.1f} GiB"
            )
        if len(mb.groups) > show_groups:
            lines.append(f"    ... {len(mb.groups) - show_groups} more groups")
    gap = "n/a (MILP skipped or no solution)" if p.mip_gap is None else f"{100 * p.mip_gap:.2f}%"
    lines += [
        "",
        "Modeled step time:",
        f"  FlexSP            {p.step_time_s:10.3f} s",
    ]
    for s in cmp.statics:
        if s.step_time_s is None:
            lines.append(f"  static SP d={s.degree:<4}  skipped: {s.reason}")
        else:
            lines.append(
                f"  static SP d={s.degree:<4}  {s.step_time_s:10.3f} s  "
                f"({s.step_time_s / p.step_time_s:.2f}x FlexSP, {s.micro_batches} micro-batches)"
            )
    lines.append(f"  ideal lower bound {p.lower_bound_s:10.3f} s  (compute only, all devices busy)")
    lines.append(f"  comm-aware bound  {p.comm_lower_bound_s:10.3f} s  (each sequence at its cheapest "
                 "group size, all-to-all included)")
    best = cmp.best_static
    if best is not None:
        lines.append(
            f"FlexSP vs best static (d={best.degree}): {best.step_time_s / p.step_time_s:.2f}x; "
            f"vs lower bound: {p.step_time_s / p.lower_bound_s:.3f}x "
            f"(vs comm-aware bound: {p.step_time_s / p.comm_lower_bound_s:.3f}x)"
        )
    pgap = "n/a" if p.plan_gap is None else f"{100 * p.plan_gap:.2f}%"
    lines.append(f"solve time {p.solve_time_s:.3f} s, MILP gap {gap}, plan gap {pgap} "
                 "(step vs the proven bound for this micro-batch split)")
    return "\n".join(lines)
