"""Planner quality on long-tail mixes (giant-first micro-batch splits), head-count-aware group
sizes, and the bound they are measured against.

* The comm-aware bound, the step-level bound and the longest-micro-batch bound
  (:mod:`dtrain.planner.stepbound`) are checked against brute force over every plan (every split into
  micro-batches, every grouping, every allowed size) on tiny instances where memory forces
  several micro-batches and the head count caps the group size.
* The plan / comm-aware-bound ratio on a generated ``chat-doc-giant`` batch (512 sequences,
  64 devices, 7b) is pinned for one seed with the greedy-only solver, which makes the plan
  independent of machine speed (the per-micro-batch solve is time-limited otherwise).
* The split (candidates and the move search) does not depend on the time limit: the same
  micro-batches with 0.01 s and 30 s; the move search makes a pinned batch faster.
"""
from __future__ import annotations

import itertools
import random

import pytest

from dtrain.planner import ClusterSpec, CostModel, PlannerError, PlannerOptions, parse_model, plan_step
from dtrain.planner.simulate import compare, sample_lengths
from dtrain.planner.stepbound import longest_batch_bound, step_lower_bound
from tests.unit.test_planner_milp import set_partitions


def one_pass_optimum(lengths: list[int], cost: CostModel) -> float:
    """Best makespan of one micro-batch: every grouping of the sequences, every allowed size."""
    n, best = cost.cluster.num_devices, float("inf")
    for part in set_partitions(list(range(len(lengths)))):
        options = []
        for block in part:
            toks = sum(lengths[i] for i in block)
            opts = [(d, sum(cost.seq_time(lengths[i], d) for i in block))
                    for d in cost.group_sizes if cost.fits(toks, d)]
            if not opts:
                break
            options.append(opts)
        else:
            for combo in itertools.product(*options):
                if sum(d for d, _ in combo) <= n:
                    best = min(best, max(t for _, t in combo))
    return best


def step_optimum(lengths: list[int], cost: CostModel) -> float:
    """Best step time over every split into micro-batches (sum of their one-pass optima)."""
    memo: dict[tuple[int, ...], float] = {}
    best = float("inf")
    for split in set_partitions(list(range(len(lengths)))):
        total = 0.0
        for block in split:
            key = tuple(sorted(lengths[i] for i in block))
            if key not in memo:
                memo[key] = one_pass_optimum(list(key), cost)
            total += memo[key]
        best = min(best, total)
    return best


def tiny_cost(heads: int) -> CostModel:
    """8 devices, 4 per node, ~8K tokens per device, ``heads`` heads (caps the group size)."""
    model = parse_model(f"layers=8,hidden=1024,heads={heads},vocab=32000")
    probe = CostModel(model, ClusterSpec(name="tiny", num_devices=8, devices_per_node=4))
    need = probe.model_state_bytes + 8000 * probe.bytes_per_token
    cluster = ClusterSpec(name="tiny", num_devices=8, devices_per_node=4, memory_GiB=1.0 + need / 1024**3,
                          reserve_GiB=1.0, inter_node_GBps=2.0)
    return CostModel(model, cluster)


def test_bound_below_brute_force_optimum_with_micro_batches_and_head_cap() -> None:
    rng = random.Random(7)
    checked = tighter = tighter_longest = 0
    for heads in (8, 2):
        cost = tiny_cost(heads)
        assert cost.group_sizes == ([1, 2, 4, 8] if heads == 8 else [1, 2])
        cap = cost.max_group_size * cost.tokens_per_device
        for _ in range(5):
            lengths = [min(int(cap), rng.choice([rng.randint(500, 3000), rng.randint(6000, 15000),
                                                 rng.randint(15000, 30000)])) for _ in range(5)]
            optimum = step_optimum(lengths, cost)
            degrees = cost.check_batch(lengths)
            bound = cost.comm_aware_lower_bound(lengths, degrees)
            assert bound <= optimum * (1 + 1e-9)
            step = step_lower_bound(lengths, cost, time_limit_s=5.0)
            assert step.status == "optimal" and step.bound >= bound
            assert step.bound <= optimum * (1 + 1e-9), (lengths, step, optimum)
            tighter += step.bound > bound * (1 + 1e-6)
            plan = plan_step(lengths, cost, PlannerOptions(time_limit_s=2.0))
            assert plan.step_time_s >= optimum * (1 - 1e-9)  # no plan beats the optimum
            longest = longest_batch_bound(lengths, cost, upper=plan.step_time_s, time_limit_s=5.0)
            assert longest.status == "optimal" and longest.bound >= bound
            assert longest.bound <= optimum * (1 + 1e-9), (lengths, longest, optimum)
            tighter_longest += longest.bound > bound * (1 + 1e-6)
            assert plan.comm_lower_bound_s == pytest.approx(bound)
            assert all(g.size in cost.group_sizes for m in plan.micro_batches for g in m.groups)
            checked += 1
    assert checked == 10
    assert tighter >= 1  # the step bound is above the comm-aware bound somewhere, else the test is moot
    assert tighter_longest >= 1  # likewise the longest-micro-batch bound


def test_chat_doc_giant_plan_within_ratio_of_comm_bound() -> None:
    cost = CostModel(parse_model("7b"), ClusterSpec())  # 64 A100-80GB in 8 nodes
    # seed: (ratio limit, measured ratio with giant-first splits and the move search, with the
    # balanced split only); without the move search the ratios were 1.100 and 1.244.
    for seed, (limit, _now, _before) in {2: (1.10, 1.067, 1.368), 1: (1.23, 1.217, 1.374)}.items():
        lengths = sample_lengths("chat-doc-giant", 512, seed=seed)
        options = PlannerOptions(solver="greedy", time_limit_s=30.0)  # every candidate tried
        plan = plan_step(lengths, cost, options)
        ratio = plan.step_time_s / plan.comm_lower_bound_s
        assert ratio <= limit, (seed, ratio)
        balanced = plan_step(lengths, cost, PlannerOptions(solver="greedy", time_limit_s=30.0, giant_splits=False))
        assert plan.step_time_s <= 0.95 * balanced.step_time_s, (seed, plan.step_time_s, balanced.step_time_s)
        assert all(g.size <= 32 for m in plan.micro_batches for g in m.groups)  # 32 heads


def test_group_sizes_divide_heads_and_too_long_is_one_line() -> None:
    # 12 heads: only groups of 1, 2 and 4 can split them, even on 64 devices.
    cost = CostModel(parse_model("layers=8,hidden=768,heads=12,vocab=32000"), ClusterSpec())
    assert cost.group_sizes == [1, 2, 4]
    tpd = int(cost.tokens_per_device)
    lengths = sample_lengths("lognormal", 48, seed=3)
    lengths = [min(s, 4 * tpd) for s in lengths] + [4 * tpd]
    cmp = compare(lengths, cost, PlannerOptions(time_limit_s=0.5))
    assert {g.size for m in cmp.plan.micro_batches for g in m.groups} <= {1, 2, 4}
    assert [s.degree for s in cmp.statics] == [1, 2, 4]
    with pytest.raises(PlannerError) as err:
        plan_step(lengths[:3] + [4 * tpd + 4], cost)
    msg = str(err.value)
    assert "\n" not in msg and "sequence 3 of length" in msg and "4 devices" in msg and "12 heads" in msg


def test_split_does_not_depend_on_the_time_limit() -> None:
    # The split search counts candidates and moves instead of watching the clock, so a tiny
    # and a generous limit give the same micro-batches (only the per-micro-batch solve differs).
    cost = CostModel(parse_model("7b"), ClusterSpec())
    lengths = sample_lengths("chat-doc-giant", 512, seed=3)
    splits = []
    for limit in (0.01, 30.0):
        plan = plan_step(lengths, cost, PlannerOptions(solver="greedy", time_limit_s=limit))
        splits.append(sorted(sorted(i for g in m.groups for i in g.sequences) for m in plan.micro_batches))
    assert splits[0] == splits[1]
    moved = plan_step(lengths, cost, PlannerOptions(solver="greedy", time_limit_s=30.0))
    unmoved = plan_step(lengths, cost, PlannerOptions(solver="greedy", time_limit_s=30.0, move_budget=0))
    assert moved.step_time_s < 0.99 * unmoved.step_time_s  # seed 3: 25.4 s against 26.1 s
