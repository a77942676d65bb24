"""FlexSP sequence-parallel planner: per step, split the devices into SP groups of different
sizes and assign the batch's sequences to them (ASPLOS 2025 FlexSP, re-derived for dtrain).

Pure Python + pulp; torch is imported only by :mod:`dtrain.planner.calibrate`.

Modules: :mod:`errors` (PlannerError), :mod:`shapes` (model shapes), :mod:`cluster` (cluster
TOML), :mod:`cost` (time/memory model), :mod:`bucketing` (length DP), :mod:`greedy` (warm
start and fallback), :mod:`milp` (the formulation), :mod:`aggregate` (relaxation: lower bound, layouts), :mod:`stepbound` (step-level bound),
:mod:`split` (giant-first splits), :mod:`solve` (planning pipeline),
:mod:`plan` (plan format), :mod:`simulate` (static baselines, workloads), :mod:`calibrate`,
:mod:`cli`.
"""
from dtrain.planner.cluster import ClusterSpec, default_cluster, load_cluster
from dtrain.planner.cost import CostModel
from dtrain.planner.errors import PlannerError
from dtrain.planner.plan import GroupPlan, MicroBatch, StepPlan
from dtrain.planner.shapes import ModelShape, parse_model
from dtrain.planner.simulate import compare, sample_lengths, static_sp
from dtrain.planner.solve import PlannerOptions, plan_step
from dtrain.planner.stepbound import StepBound, step_lower_bound

__all__ = [
    "ClusterSpec", "CostModel", "GroupPlan", "MicroBatch", "ModelShape", "PlannerError",
    "PlannerOptions", "StepBound", "StepPlan", "compare", "default_cluster", "load_cluster",
    "parse_model", "plan_step", "sample_lengths", "static_sp", "step_lower_bound",
]
