"""The MILP and the full planner against brute-force optima on small instances."""
from __future__ import annotations

import itertools
import random

import pytest

from dtrain.planner.bucketing import bucket_lengths
from dtrain.planner.cluster import ClusterSpec
from dtrain.planner.cost import CostModel, power_of_two_sizes
from dtrain.planner.milp import solve_milp
from dtrain.planner.shapes import parse_model
from dtrain.planner.solve import PlannerOptions, plan_step


MODEL = parse_model("layers=8,hidden=1024,heads=8,vocab=32000")


def small_cost(num_devices: int, per_node: int = 4, tokens_per_device: float = 8000.0) -> CostModel:
    """A small model on a small cluster sized so that one device holds ~8K tokens (memory binds)."""
    probe = CostModel(MODEL, ClusterSpec(name="tiny", num_devices=num_devices, devices_per_node=per_node))
    need = probe.model_state_bytes + tokens_per_device * probe.bytes_per_token
    cluster = ClusterSpec(
        name="tiny", num_devices=num_devices, devices_per_node=per_node,
        memory_GiB=1.0 + need / 1024**3, reserve_GiB=1.0, inter_node_GBps=2.0,
    )
    return CostModel(MODEL, cluster)


def set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


def brute_force(lengths: list[int], cost: CostModel) -> float:
    """Optimal makespan: every set partition of the sequences into groups, every size choice."""
    n = cost.cluster.num_devices
    sizes = power_of_two_sizes(n)
    best = float("inf")
    for part in set_partitions(list(range(len(lengths)))):
        options = []
        for block in part:
            toks = sum(lengths[i] for i in block)
            opts = [
                (d, sum(cost.seq_time(lengths[i], d) for i in block))
                for d in sizes if cost.fits(toks, d)
            ]
            if not opts:
                break
            options.append(opts)
        else:
            for combo in itertools.product(*options):
                if sum(d for d, _ in combo) <= n:
                    best = min(best, max(t for _, t in combo))
    return best


def random_instance(rng: random.Random, n_seq: int) -> list[int]:
    return [rng.choice([rng.randint(500, 4000), rng.randint(4000, 12000), rng.randint(12000, 30000)])
            for _ in range(n_seq)]


def _single_pass_instances(cost, seed: int, count: int = 6):
    """``count`` random small batches that fit one pass and have a finite brute-force optimum."""
    rng = random.Random(seed)
    found = 0
    for _attempt in range(200):
        if found == count:
            return
        lengths = random_instance(rng, rng.randint(3, 6))
        if sum(lengths) > 0.95 * cost.cluster.num_devices * cost.tokens_per_device:
            continue  # needs micro-batches; the MILP covers one pass
        optimum = brute_force(lengths, cost)
        if optimum == float("inf"):
            continue
        found += 1
        yield lengths, optimum
    assert found == count, f"only {found} of {count} usable instances in 200 draws"


@pytest.mark.parametrize("num_devices", [4, 8])
def test_milp_objective_equals_brute_force(num_devices: int) -> None:
    cost = small_cost(num_devices)
    for lengths, optimum in _single_pass_instances(cost, seed=num_devices):
        buckets = bucket_lengths(lengths, max_buckets=len(lengths))  # exact: one per length
        degrees = [cost.min_degree(b.length) for b in buckets]
        res = solve_milp(buckets, degrees, cost, time_limit_s=20.0, gap_rel=1e-9)
        assert res.status == "optimal"
        assert res.objective == pytest.approx(optimum, rel=1e-6)
        # The whole planner (greedy + MILP + assignment) reaches the single-pass optimum, or
        # beats it by splitting into two micro-batches (more memory room per pass).
        plan = plan_step(lengths, cost, PlannerOptions(max_buckets=8, time_limit_s=20.0, gap_rel=1e-9))
        if len(plan.micro_batches) == 1:
            assert plan.step_time_s == pytest.approx(optimum, rel=1e-6)
        else:
            assert plan.step_time_s <= optimum * (1 + 1e-9)


def test_milp_with_warm_start_and_cbc_match_brute_force() -> None:
    cost = small_cost(8)
    lengths = [2500, 9000, 15000, 700, 12000]
    optimum = brute_force(lengths, cost)
    buckets = bucket_lengths(lengths, 5)
    degrees = [cost.min_degree(b.length) for b in buckets]
    # A deliberately poor but feasible warm start: every bucket on its own minimum-size group.
    warm = [(degrees[b], {b: 1}) for b in range(len(buckets))]
    assert sum(d for d, _ in warm) <= 8
    res = solve_milp(buckets, degrees, cost, 20.0, 1e-9, warm=warm)
    assert res.objective == pytest.approx(optimum, rel=1e-6)
    cbc = solve_milp(buckets, degrees, cost, 20.0, 1e-9, warm=None, solver="cbc")
    assert cbc.solver == "milp-cbc"
    assert cbc.objective == pytest.approx(optimum, rel=1e-6)


def test_milp_respects_memory_and_devices() -> None:
    cost = small_cost(8)
    lengths = [20000, 7000, 9000, 5000, 8000, 3000]
    buckets = bucket_lengths(lengths, 6)
    degrees = [cost.min_degree(b.length) for b in buckets]
    res = solve_milp(buckets, degrees, cost, 20.0, 1e-9)
    assert sum(d for d, _ in res.groups) <= 8
    for d, members in res.groups:
        tokens = sum(buckets[b].length * k for b, k in members.items())
        assert cost.fits(tokens, d)
        assert all(degrees[b] <= d for b in members)
    assert sum(k for _, m in res.groups for k in m.values()) == len(lengths)


@pytest.mark.parametrize("num_devices", [4, 8])
def test_aggregated_bound_never_exceeds_brute_force(num_devices: int) -> None:
    """The aggregated relaxation (classes at their shortest member) bounds the true optimum."""
    from dtrain.planner.aggregate import aggregate_lower_bound

    cost = small_cost(num_devices)
    for lengths, optimum in _single_pass_instances(cost, seed=100 + num_devices):
        degrees = [cost.min_degree(s) for s in lengths]
        lower = cost.comm_aware_lower_bound(lengths, degrees)
        ordered = sorted(lengths)
        classes = [ordered[: len(ordered) // 2], ordered[len(ordered) // 2:]]  # coarse classes
        for upper in (optimum, 1.5 * optimum):
            res = aggregate_lower_bound(classes, cost, lower, upper, 1e-3, 10.0)
            assert lower <= res.bound <= optimum * (1 + 1e-9)
        exact = aggregate_lower_bound([[s] for s in lengths], cost, lower, 2 * optimum, 1e-3, 10.0)
        assert exact.bound <= optimum * (1 + 1e-9)
