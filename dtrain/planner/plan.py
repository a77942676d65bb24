"""Plan format: what a runtime executes for one training step, JSON-serialisable.

A :class:`StepPlan` is an ordered list of :class:`MicroBatch` es. Micro-batches run in order;
inside one, every :class:`GroupPlan` runs concurrently on its own ranks and processes its
sequences (indices into the batch) one after another. Group ranks are contiguous and
aligned (a group of ``d`` devices starts at a multiple of ``d``), so a group of at most
``devices_per_node`` devices stays inside one node.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GroupPlan:
    """One SP group of a micro-batch."""

    size: int
    ranks: list[int]
    crosses_nodes: bool
    sequences: list[int]  # indices into the batch, in execution order
    lengths: list[int]
    time_s: float  # modeled time of this group's sequences (true lengths)
    memory_bytes: float  # modeled peak per-device bytes (states + activations)


@dataclass
class MicroBatch:
    """Groups that run concurrently; the micro-batch ends when its slowest group ends."""

    groups: list[GroupPlan]
    time_s: float
    solver: str  # "milp-highs", "milp-cbc" or "greedy"
    mip_objective_s: float | None = None  # bucketed MILP objective, if the MILP solved
    mip_bound_s: float | None = None  # solver's best bound on the bucketed MILP
    mip_gap: float | None = None  # (objective - bound) / objective of the bucketed MILP
    solve_time_s: float = 0.0
    lower_bound_s: float | None = None  # valid bound on this micro-batch's real-length optimum


@dataclass
class StepPlan:
    """The FlexSP plan for one batch (one optimizer step)."""

    num_devices: int
    devices_per_node: int
    model: str
    lengths: list[int]
    micro_batches: list[MicroBatch]
    step_time_s: float  # sum of micro-batch times
    lower_bound_s: float  # ideal lower bound (compute only, spread over all devices)
    comm_lower_bound_s: float  # valid lower bound including all-to-all (cost.comm_aware_lower_bound)
    solve_time_s: float  # wall time of planning (bucketing + greedy + MILP + assignment)
    memory_limit_bytes: float  # per-device memory available (device memory - reserve)
    options: dict[str, Any] = field(default_factory=dict)
    solve_cpu_s: float = 0.0  # CPU time of planning (this process), less sensitive to machine load

    @property
    def mip_gap(self) -> float | None:
        """Aggregated bucketed-MILP gap ``(sum obj - sum bound) / sum obj``; None if any fell back."""
        objs = [m.mip_objective_s for m in self.micro_batches]
        bounds = [m.mip_bound_s for m in self.micro_batches]
        if any(o is None for o in objs) or any(b is None for b in bounds):
            return None
        total = sum(objs)  # type: ignore[arg-type]
        return max(0.0, (total - sum(bounds)) / total) if total > 0 else 0.0  # type: ignore[arg-type]

    @property
    def plan_gap(self) -> float | None:
        """``(step - sum of micro-batch bounds) / step``: the plan's proven optimality gap for its
        micro-batch split, on the real lengths (bounds: comm-aware and aggregated, see
        :mod:`dtrain.planner.aggregate`); None if a micro-batch has no bound."""
        bounds = [m.lower_bound_s for m in self.micro_batches]
        if any(b is None for b in bounds) or self.step_time_s <= 0:
            return None
        return max(0.0, (self.step_time_s - sum(bounds)) / self.step_time_s)  # type: ignore[arg-type]

    @property
    def lower_bound_gap(self) -> float:
        """``(step - ideal lower bound) / step``: an upper bound on the true optimality gap."""
        return max(0.0, (self.step_time_s - self.lower_bound_s) / self.step_time_s)

    @property
    def comm_lower_bound_gap(self) -> float:
        """``(step - comm-aware lower bound) / step``: a tighter upper bound on the true gap."""
        return max(0.0, (self.step_time_s - self.comm_lower_bound_s) / self.step_time_s)

    @property
    def solvers(self) -> list[str]:
        return [m.solver for m in self.micro_batches]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepPlan":
        mbs = [
            MicroBatch(**{**m, "groups": [GroupPlan(**g) for g in m["groups"]]})
            for m in data["micro_batches"]
        ]
        return cls(**{**data, "micro_batches": mbs})

    @classmethod
    def from_json(cls, text: str) -> "StepPlan":
        return cls.from_dict(json.loads(text))


def place_groups(sizes: list[int], num_devices: int, devices_per_node: int) -> list[tuple[list[int], bool]]:
    """Contiguous aligned rank lists for power-of-two group sizes (buddy placement).

    Groups are placed largest first at increasing offsets; because every size is a power of
    two and sizes do not increase, each offset is a multiple of the group's size. Returns
    ``(ranks, crosses_nodes)`` in the order of ``sizes``. Requires ``sum(sizes) <= num_devices``.
    """
    if sum(sizes) > num_devices:
        raise ValueError(f"groups need {sum(sizes)} devices, only {num_devices} exist")
    order = sorted(range(len(sizes)), key=lambda k: (-sizes[k], k))
    out: list[tuple[list[int], bool]] = [([], False)] * len(sizes)
    offset = 0
    for k in order:
        d = sizes[k]
        ranks = list(range(offset, offset + d))
        crosses = ranks[0] // devices_per_node != ranks[-1] // devices_per_node
        out[k] = (ranks, crosses)
        offset += d
    return out
