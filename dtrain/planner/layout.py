"""Planner for per-kind zero levels: ``dtrain plan layout``, ``dtrain plan memory``, ``zero.preset = "auto"``.

Every valid assignment of (params, grads, optim, backward_params) to the cluster's levels
(:func:`dtrain.hierarchy.resolve_levels` decides validity) is costed with the volume formula
(:func:`dtrain.hierarchy.step_volume`, docs/hierarchical.md) into a predicted *step time*
(:func:`predict_step`):

* communication ``m``: per level, bytes / the level's bandwidth plus one latency per collective,
  intra-node levels at the cluster file's ``intra_node_GBps`` / ``intra_node_latency_us`` and
  levels spanning nodes at the inter-node figures (collectives over peer groups, one rank per
  node or block, at the ``*_node_peers_*`` figures of its ``[calibration]`` table when present:
  the ranks of a node share its link); levels are summed (they share the CPUs and
  the ranks' issue order);
* compute ``c``: ``step_overhead_s + tokens_per_rank * dense_flops_per_token / (linear_TFLOPS
  1e12)``, the same for every assignment, plus the optimizer's step of this rank's optim part
  (``optim_s_per_param`` of the calibration x the parameters / the optim level's size), which
  runs after the backward and is never hidden;
* step, phase by phase (:func:`dtrain.hierarchy.step_volume` files each collective under the
  phase it runs in): ``t = o + sum over forward, backward of (c_ph + m_ph - overlap * min(c_ph,
  m_ph)) + m_update``, with ``o`` the per-step overhead, the compute split 1 : 2 between forward
  and backward (the FLOP ratio), and the update's collectives (publishing parameters) exposed.
  ``overlap`` = 0 is the plain sum (nothing hidden), 1 hides each phase's communication behind
  its compute up to the longer of the two. An assignment whose cross-node traffic is all in the
  backward (HSDP) can hide less of it than one that spreads it over both phases (hpZ).

``dtrain plan calibrate --layout`` measures all of these on 2 namespaced hosts (docs/hierarchical.md,
"Predicting the step time"); an uncalibrated cluster file has ``step_overhead_s`` = 0 and
``overlap`` = 0. Without a token count the compute term is 0 and the ranking is by communication.
Memory per rank is :func:`state_bytes_per_rank` (the persistent state; activations are not
counted). The assignment with the least predicted step time that fits ``--memory-gb`` wins.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from dtrain.config import ConfigError
from dtrain.hierarchy import KINDS, Levels, resolve_levels, step_volume
from dtrain.planner.cluster import ClusterSpec, default_cluster, load_cluster
from dtrain.planner.errors import PlannerError
from dtrain.topology import Shape

GB = 1e9


def state_bytes_per_rank(units: Sequence[int], levels: Levels, *, optim_states: int = 2,
                         tiers: Mapping[str, str] | None = None, root_unit: int | None = None) -> dict[str, dict[str, int]]:
    """Persistent bytes one rank holds per tier and kind (params, grads, optim) under ``levels``.

    ``units`` are padded element counts; ``optim_states`` fp32 values per element (Adam: 2);
    ``tiers`` maps a kind to the tier holding it (default: every kind on ``device``); this is where
    an offload tier's choice plugs in. ``root_unit`` is the index of the unit kept gathered from
    forward to backward (no backward copy). With ``backward_params = "rank"`` under split
    parameters the gathered units stay alive through the backward: counted here as a full copy.
    """
    tiers = dict(tiers or {})
    p = sum(units)
    s_p, s_g, s_o, s_b = (levels.size(k) for k in KINDS)
    params = 4 * p // s_p
    if s_b < s_p:  # the backward copy (s_b = 1: every unit stays gathered from forward to backward)
        params += 4 * sum(u for i, u in enumerate(units) if i != root_unit) // s_b
    kinds = {"params": params, "grads": 4 * p // s_g, "optim": optim_states * 4 * p // s_o}
    out: dict[str, dict[str, int]] = {}
    for kind, nbytes in kinds.items():
        out.setdefault(tiers.get(kind, "device"), {})[kind] = nbytes
    return out


def shape_of_cluster(cluster: ClusterSpec) -> Shape:
    nodes = max(1, cluster.num_devices // cluster.devices_per_node)
    return Shape.of(cluster.num_devices, 0, nodes)


def valid_assignments(shape: Shape) -> list[Levels]:
    names = ["rank", *dict.fromkeys(n for n, _ in shape.levels)]
    sizes = {n: shape.size(n) for n in names}
    unique = list({sizes[n]: n for n in reversed(names)}.values())  # one name per block size
    out = []
    for combo in itertools.product(unique, repeat=4):
        section = SimpleNamespace(stage=0, preset=None, **dict(zip(KINDS, combo)))
        try:
            out.append(resolve_levels(section, shape))
        except ConfigError:
            continue
    return out


@dataclass
class Candidate:
    levels: Levels
    bytes_per_level: dict[str, int]
    time_s: float  # predicted step time: compute and communication (predict_step)
    memory_bytes: int
    feasible: bool
    comm_s: float = 0.0
    compute_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.levels.as_dict(), "bytes_per_level": self.bytes_per_level, "predicted_step_s": self.time_s,
                "predicted_step_comm_s": self.comm_s, "predicted_compute_s": self.compute_s,
                "memory_bytes_per_rank": self.memory_bytes, "feasible": self.feasible}


@dataclass(frozen=True)
class StepModel:
    """The compute side of a step and how communication overlaps it (from the cluster file)."""

    flops_per_s: float  # effective training FLOP rate of one rank (cluster linear_TFLOPS)
    step_overhead_s: float = 0.0  # per step, whatever the tokens (kernel launches, Python)
    overlap: float = 0.0  # per phase, 0: compute + comm; 1: max(compute, comm)
    optim_s_per_param: float = 0.0  # the optimizer's step per element of the optim part (0: in the overhead)

    @classmethod
    def of(cls, cluster: ClusterSpec) -> "StepModel":
        cal = cluster.calibration or {}
        return cls(cluster.linear_TFLOPS * 1e12, float(cal.get("step_overhead_s", 0.0)),
                   min(1.0, max(0.0, float(cal.get("comm_overlap", 0.0)))), float(cal.get("optim_s_per_param", 0.0)))

    def compute_s(self, flops_per_token: float, tokens_per_rank: float) -> float:
        if tokens_per_rank <= 0:
            return 0.0
        return self.step_overhead_s + tokens_per_rank * flops_per_token / self.flops_per_s

    def phase_compute(self, compute_s: float) -> dict[str, float]:
        """The compute of a step by phase: forward and backward at 1 : 2 after the fixed overhead."""
        work = max(0.0, compute_s - self.step_overhead_s)
        return {"forward": work / 3, "backward": 2 * work / 3}

    def hidden_s(self, compute_s: float, phase_comm: Mapping[str, float]) -> float:
        """Communication seconds the overlap hides behind compute (forward and backward only)."""
        work = self.phase_compute(compute_s)
        return self.overlap * sum(min(work[ph], phase_comm.get(ph, 0.0)) for ph in work)

    def step_s(self, compute_s: float, phase_comm: Mapping[str, float]) -> float:
        return compute_s + sum(phase_comm.values()) - self.hidden_s(compute_s, phase_comm)

    def optim_s(self, units: Sequence[int], levels: Levels) -> float:
        """The optimizer's step of this rank's optim part: after the backward, never hidden, and
        smaller the wider the optimizer state is sharded."""
        return self.optim_s_per_param * sum(units) / levels.size("optim")


def predict_step(units: Sequence[int], levels: Levels, shape: Shape, cluster: ClusterSpec, *,
                 flops_per_token: float = 0.0, tokens_per_rank: float = 0.0, grad_accum: int = 1,
                 gather_dtype: str = "fp32") -> dict[str, Any]:
    """Predicted ``step_s`` = compute + communication - overlap (module docstring), with its parts."""
    volume, phase_comm = predict(units, levels, shape, cluster, grad_accum, gather_dtype)
    model = StepModel.of(cluster)
    compute = model.compute_s(flops_per_token, tokens_per_rank)
    optim = model.optim_s(units, levels)
    return {"step_s": model.step_s(compute, phase_comm) + optim, "compute_s": compute + optim,
            "optim_s": optim, "comm_s": sum(phase_comm.values()), "comm_s_by_phase": phase_comm,
            "bytes_per_level": volume}


def predict(units: Sequence[int], levels: Levels, shape: Shape, cluster: ClusterSpec, grad_accum: int = 1,
            gather_dtype: str = "fp32") -> tuple[dict[str, int], dict[str, float]]:
    """Bytes per level and predicted communication seconds of one step per phase (forward,
    backward, update)."""
    phases: dict[str, dict[str, list[int]]] = {}
    volume = step_volume(units, levels, shape, backward_units=units[:-1], grad_accum=grad_accum,
                         gather_dtype=gather_dtype, phases=phases)
    node = shape.size("node")
    cal = cluster.calibration or {}
    seconds = {"forward": 0.0, "backward": 0.0, "update": 0.0}
    for phase, per_level in phases.items():
        for key, (nbytes, count) in per_level.items():
            level, _, peers = key.partition("/")
            side = "intra" if shape.size(level) <= node else "inter"
            bw = getattr(cluster, f"{side}_node_GBps")
            lat = getattr(cluster, f"{side}_node_latency_us")
            if peers:  # peer groups, where calibrated on their own (dtrain plan calibrate --layout)
                bw = cal.get(f"{side}_node_peers_GBps", bw)
                lat = cal.get(f"{side}_node_peers_latency_us", lat)
            seconds[phase] += nbytes / (bw * GB) + count * lat * 1e-6
    return volume, seconds


def plan_layouts(units: Sequence[int], shape: Shape, cluster: ClusterSpec, memory_bytes: float | None = None,
                 grad_accum: int = 1, *, flops_per_token: float = 0.0, tokens_per_rank: float = 0.0
                 ) -> list[Candidate]:
    """Every valid assignment with its predicted step time and memory, best (feasible, fastest) first."""
    out = []
    for levels in valid_assignments(shape):
        p = predict_step(units, levels, shape, cluster, flops_per_token=flops_per_token,
                         tokens_per_rank=tokens_per_rank, grad_accum=grad_accum)
        memory = sum(sum(k.values()) for k in state_bytes_per_rank(units, levels,
                                                                   root_unit=len(units) - 1).values())
        out.append(Candidate(levels, p["bytes_per_level"], p["step_s"], memory,
                             memory_bytes is None or memory <= memory_bytes, p["comm_s"], p["compute_s"]))
    out.sort(key=lambda c: (not c.feasible, c.time_s, c.memory_bytes))
    return out


def model_units(model: Any) -> list[int]:
    """A model shape's units as ZeRO-3 forms them: one per layer, then the root (embeddings)."""
    embed = model.vocab * model.hidden * (1 if model.tied_embeddings else 2)
    return [model.params_per_layer] * model.layers + [embed]


def layout_units(model: Any, shape: Shape, unit_classes: Sequence[str] = ()) -> list[int]:
    """The padded sizes of the units the zero layout forms for ``model`` when parameters are split
    (:func:`dtrain.partition.module_units`: one per wrapped module, the root last)."""
    from dtrain.partition import module_units, trainable_params

    groups = {id(p): 0 for _, p in trainable_params(model)}
    return [u.padded for u in module_units(model, groups, list(unit_classes), shape.world_size)]


def choose_levels(layout: Any, shape: Shape) -> dict[str, str]:
    """``zero.preset = "auto"`` at start-up: the planner's fastest assignment for this model on this
    shape, with the model's real units (:func:`layout_units`) and the cluster file named by the
    environment variable ``DTRAIN_CLUSTER`` (default: the planner's default, cluster/a100_8x8.toml).
    ``zero.auto_tokens_per_step`` gives the tokens of one step (the batch is not known at start-up);
    without it the compute term is left out, nothing is hidden, and the ranking is by the step's
    communication and optimizer time."""
    import os

    path = os.environ.get("DTRAIN_CLUSTER")
    cluster = load_cluster(path) if path else default_cluster()
    cluster = ClusterSpec(**{**cluster.__dict__, "num_devices": shape.world_size,
                             "devices_per_node": shape.size("node")})
    zcfg = getattr(getattr(getattr(layout, "engine", None), "config", None), "zero", None)
    units = layout_units(layout.model, shape, getattr(zcfg, "unit_classes", None) or ())
    tokens = getattr(zcfg, "auto_tokens_per_step", 0) or 0
    # dense training FLOPs per token: 6 per trainable parameter (forward 2, backward 4)
    flops = 6.0 * sum(p.numel() for p in layout.model.parameters() if p.requires_grad) if tokens else 0.0
    best = plan_layouts(units, shape, cluster, flops_per_token=flops, tokens_per_rank=tokens / shape.world_size)[0]
    return best.levels.as_dict()


# ----------------------------------------------------------------------- CLI
def add_subcommands(sub: Any) -> None:
    """``dtrain plan layout`` and ``dtrain plan memory`` (added to planner/cli.py's subparsers)."""
    lay = sub.add_parser("layout", help="choose the zero level of each kind of state for a cluster")
    lay.add_argument("--model", default="7b", help="7b, 13b, gpt-bench or layers=..,hidden=..,heads=..,vocab=..")
    lay.add_argument("--cluster", metavar="FILE", help="cluster TOML (default cluster/a100_8x8.toml)")
    lay.add_argument("--memory-gb", type=float, default=None, help="per-rank limit for the persistent state")
    lay.add_argument("--grad-accum", type=int, default=1)
    lay.add_argument("--tokens-per-step", type=int, default=0, metavar="N",
                     help="global tokens per optimizer step, for the compute term (0: communication only)")
    lay.add_argument("--json", action="store_true")
    mem = sub.add_parser("memory", help="per-rank bytes per kind and tier for a zero config")
    mem.add_argument("--model", default="7b")
    mem.add_argument("--cluster", metavar="FILE", help="cluster TOML (for the world and node size)")
    mem.add_argument("--config", metavar="FILE", help="dtrain config TOML (its zero section)")
    mem.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    mem.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dtrain.planner.shapes import parse_model

    cluster = load_cluster(args.cluster) if args.cluster else default_cluster()
    shape = shape_of_cluster(cluster)
    model = parse_model(args.model)
    units = model_units(model)
    if args.command == "layout":
        if args.memory_gb is not None and args.memory_gb <= 0:
            raise PlannerError(f"--memory-gb {args.memory_gb} must be positive")
        if args.tokens_per_step < 0:
            raise PlannerError(f"--tokens-per-step {args.tokens_per_step} must be >= 0")
        cands = plan_layouts(units, shape, cluster, None if args.memory_gb is None else args.memory_gb * GB,
                             args.grad_accum, flops_per_token=model.dense_flops_per_token,
                             tokens_per_rank=args.tokens_per_step / cluster.num_devices)
        if not cands[0].feasible:
            raise PlannerError(f"no assignment fits {args.memory_gb} GB per rank for {model.name} on "
                               f"{cluster.num_devices} ranks (smallest needs "
                               f"{min(c.memory_bytes for c in cands) / GB:.2f} GB); add ranks or offload")
        if args.json:
            print(json.dumps({"choice": cands[0].to_dict(), "candidates": [c.to_dict() for c in cands],
                              "step_model": StepModel.of(cluster).__dict__, "cluster": cluster.name,
                              "tokens_per_step": args.tokens_per_step}, sort_keys=True))
            return 0
        print(f"{model.name} ({sum(units) / 1e6:.1f} M params) on {cluster.name}: {cluster.num_devices} ranks, "
              f"{cluster.devices_per_node} per node")
        print(f"{'params':>7} {'grads':>7} {'optim':>7} {'bwd':>7} {'step s':>9} {'compute':>9} {'comm':>9} "
              f"{'GB/rank':>8}  bytes per level")
        for c in cands:
            lv = c.levels
            vol = ", ".join(f"{k} {v / GB:.3g} GB" for k, v in sorted(c.bytes_per_level.items()))
            mark = "" if c.feasible else "  (over memory)"
            print(f"{lv.params:>7} {lv.grads:>7} {lv.optim:>7} {lv.backward_params:>7} {c.time_s:9.4f} "
                  f"{c.compute_s:9.4f} {c.comm_s:9.4f} {c.memory_bytes / GB:8.2f}  {vol}{mark}")
        lv = cands[0].levels
        what = "per step" if args.tokens_per_step else "of communication per step (no --tokens-per-step)"
        print(f"choice: zero.params={lv.params} zero.grads={lv.grads} zero.optim={lv.optim} "
              f"zero.backward_params={lv.backward_params} (predicted {cands[0].time_s:.4f} s {what})")
        return 0
    from dtrain.config import Config
    from dtrain.hierarchy import check_zero_config

    config = Config.load(args.config, args.set, defer_unknown_sections=True)
    levels = check_zero_config(config.zero, shape)
    tiers = state_bytes_per_rank(units, levels, root_unit=len(units) - 1)
    from dtrain.offload.param_plan import plan_param_tiers
    from dtrain.offload.placement import plan_memory_tiers  # issue 14: the offload tier's per-unit choice

    tiers = plan_param_tiers(config, units, levels.size("params"), tiers, show=not args.json)
    tiers = plan_memory_tiers(config, units, levels.size("optim"), tiers, show=not args.json,
                              grad_parts=levels.size("grads"))
    if args.json:
        print(json.dumps({"levels": levels.as_dict(), "bytes_per_rank": tiers}, sort_keys=True))
        return 0
    print(f"{model.name} on {cluster.num_devices} ranks ({cluster.devices_per_node} per node); {levels.describe()}")
    for tier, kinds in tiers.items():
        for kind, nbytes in kinds.items():
            print(f"{tier:>7} {kind:>7} {nbytes / GB:10.3f} GB")
    print(f"{'total':>15} {sum(sum(k.values()) for k in tiers.values()) / GB:10.3f} GB per rank")
    return 0
