"""Per-kind sharding levels of the ``zero`` layout and the communication volume they cost.

Each kind of training state is split over the ranks of one topology level (docs/topology.md):
``params`` (the working parameters), ``grads`` (accumulated gradients), ``optim`` (the fp32 master
values and the optimizer's element-wise state) and ``backward_params`` (the copy the backward
all-gather reads; hpZ's secondary copy when smaller than ``params``). ``rank`` means unsplit.
This module is torch-free: the launcher's preflight, the planner and the rank all resolve a
config to :class:`Levels` through :func:`resolve_levels`, and :func:`step_volume` is the volume
formula of docs/hierarchical.md, which the layout's measured ``comm_bytes`` equal exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from dtrain.config import ConfigError
from dtrain.topology import Shape

KINDS = ("params", "grads", "optim", "backward_params")
STAGE_LEVELS = {  # zero.stage as a shorthand: which kinds are split over the data-parallel level
    0: {"params": False, "grads": False, "optim": False},
    1: {"params": False, "grads": False, "optim": True},
    2: {"params": False, "grads": True, "optim": True},
    3: {"params": True, "grads": True, "optim": True},
}
PRESETS = ("hsdp", "hpz", "frontier3", "auto")
GATHER_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}
INT8_BLOCK = 256
"""Elements per int8 quantisation block; each block carries one fp32 scale."""


@dataclass(frozen=True)
class Levels:
    """The level (name) and block size of every kind, plus the data-parallel level."""

    params: str
    grads: str
    optim: str
    backward_params: str
    sizes: tuple[tuple[str, int], ...]  # kind -> block size, plus "dp"
    dp: str = "global"
    preset: str | None = None

    def size(self, kind: str) -> int:
        return dict(self.sizes)[kind]

    def chain(self) -> list[int]:
        """The distinct block sizes in use, 1 first: the steps of every hierarchical collective."""
        return sorted({1, *(self.size(k) for k in KINDS)})

    def describe(self) -> str:
        text = ", ".join(f"{k}={getattr(self, k)}" for k in KINDS)
        return f"zero.preset = {self.preset!r} -> {text}" if self.preset else f"zero levels: {text}"

    def as_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in KINDS}


def preset_levels(preset: str, shape: Shape) -> dict[str, str]:
    """A named preset's levels on ``shape`` (``auto`` is the planner's; see dtrain.planner.layout)."""
    if preset == "hsdp":  # PyTorch HSDP: shard inside a node, replicate across nodes
        return {"params": "node", "grads": "node", "optim": "node", "backward_params": "node"}
    if preset == "hpz":  # ZeRO++ hpZ: ZeRO-3, plus a node-local secondary copy for the backward
        return {"params": "global", "grads": "global", "optim": "global", "backward_params": "node"}
    if preset == "frontier3":  # three levels (arXiv 2501.04266): pair < node < global
        inner = [n for n, s in shape.levels if 1 < s < shape.size("node")]
        return {"params": "node", "grads": "node", "optim": "global",
                "backward_params": inner[-1] if inner else "node"}
    raise ConfigError(f"zero.preset = {preset!r} is not known; use one of {', '.join(PRESETS)}")


def resolve_levels(zero: Any, shape: Shape, dp: str = "global", auto: Mapping[str, str] | None = None) -> Levels:
    """The levels a ``zero`` config section asks for on ``shape``; ConfigError (one line) if invalid.

    ``zero.stage`` gives the defaults (split kinds at ``dp``, the rest at ``rank``), a preset
    replaces them, and explicit ``zero.params``/``grads``/``optim``/``backward_params`` win over
    both. ``auto`` is the planner's choice for ``zero.preset = "auto"``.
    """
    split = STAGE_LEVELS[int(getattr(zero, "stage", 0) or 0)]
    chosen = {k: (dp if split[k] else "rank") for k in ("params", "grads", "optim")}
    preset = getattr(zero, "preset", None)
    if preset == "auto":
        if not auto:
            raise ConfigError("zero.preset = 'auto' needs the planner's choice (dtrain.planner.layout.choose_levels)")
        chosen = dict(auto)
    elif preset:
        chosen = preset_levels(preset, shape)
    for kind in KINDS:
        value = getattr(zero, kind, None)
        if value:
            chosen[kind] = value
    chosen.setdefault("backward_params", chosen["params"])
    sizes: dict[str, int] = {}
    for kind in KINDS:
        try:
            sizes[kind] = shape.size(chosen[kind])
        except ConfigError:
            raise ConfigError(f"zero.{kind} = {chosen[kind]!r} is not a topology level; use rank, "
                              f"{', '.join(shape.level_names)} (declare more in topology.levels)") from None
    dp_size = shape.size(dp)
    for kind in KINDS:
        if sizes[kind] > dp_size or dp_size % sizes[kind]:
            raise ConfigError(f"zero.{kind} = {chosen[kind]!r} ({sizes[kind]} ranks) is larger than the "
                              f"data-parallel group {dp!r} ({dp_size} ranks); use a level inside it")
    if sizes["grads"] > sizes["optim"]:
        raise ConfigError(f"zero.grads = {chosen['grads']!r} ({sizes['grads']} ranks) is larger than zero.optim = "
                          f"{chosen['optim']!r} ({sizes['optim']}): each rank steps the optimizer on gradients it "
                          f"holds, so grads must be split at the optim level or a smaller one")
    if sizes["params"] > sizes["optim"]:
        raise ConfigError(f"zero.params = {chosen['params']!r} ({sizes['params']} ranks) is larger than zero.optim = "
                          f"{chosen['optim']!r} ({sizes['optim']}): the fp32 parameters are the optimizer's master "
                          f"values, so a rank must hold the parameters it updates; split params at the optim level "
                          f"or a smaller one")
    if sizes["backward_params"] > sizes["params"]:
        raise ConfigError(f"zero.backward_params = {chosen['backward_params']!r} ({sizes['backward_params']} ranks) is "
                          f"larger than zero.params = {chosen['params']!r} ({sizes['params']}): the backward copy is "
                          f"gathered from the parameter shard, so it can only be split at that level or a smaller one")
    table = tuple((k, sizes[k]) for k in KINDS) + (("dp", dp_size),)
    return Levels(chosen["params"], chosen["grads"], chosen["optim"], chosen["backward_params"], table, dp,
                  preset or None)


def check_zero_config(zero: Any, shape: Shape) -> Levels:
    """Preflight: the ``zero`` section's levels on a known world (raises ConfigError)."""
    if getattr(zero, "preset", None) == "auto":
        return resolve_levels(zero, shape, auto=preset_levels("hsdp", shape) if shape.nodes > 1 else
                              {"params": "global", "grads": "global", "optim": "global", "backward_params": "global"})
    return resolve_levels(zero, shape)


# ----------------------------------------------------------------- indexing
def chain_index(rank: int, size: int, chain: Sequence[int]) -> int:
    """This rank's part index at block size ``size`` when every level of ``chain`` nests.

    Write ``rank % size`` in the mixed radix of ``chain`` (least significant digit = position in
    the smallest block) and reverse the digits' significance: then the part a rank holds at each
    level of the chain lies inside the part it holds at every smaller level, so the optimizer
    steps views of the parameter and gradient parts (no copies) and every hierarchical collective
    is a sequence of contiguous all-gathers / reduce-scatters over one level step at a time.
    With one level in use this is the plain ``rank % size``.
    """
    steps = [s for s in chain if s <= size]
    index, weight = 0, size
    for small, big in zip(steps, steps[1:]):
        weight //= big // small
        index += ((rank % big) // small) * weight
    return index


def step_groups(shape: Shape, small: int, big: int) -> list[int]:
    """Rank 0's group of one level step: the ranks of its ``big`` block at the same position
    inside their ``small`` blocks (``small`` = 1: the whole block)."""
    return list(range(0, big, small))


# ------------------------------------------------------------------ volume
def _ring(op: str, nbytes: int, n: int) -> int:
    if n <= 1:
        return 0
    return (2 if op == "all_reduce" else 1) * (n - 1) * nbytes // n


def step_volume(units: Sequence[int], levels: Levels, shape: Shape, *, backward_units: Sequence[int] | None = None,
                grad_accum: int = 1, gather_dtype: str = "fp32", clip: bool = False,
                counts: dict[str, int] | None = None,
                phases: dict[str, dict[str, list[int]]] | None = None) -> dict[str, int]:
    """Bytes one rank sends per optimizer step, per level, for the layout's own collectives.

    ``units`` are the padded element counts of every unit; ``backward_units`` those re-gathered
    for the backward (ZeRO-3 keeps the root unit, the first one gathered, through the backward).
    Ring costs (docs/hierarchical.md): a step over ``n`` ranks moving ``M`` bytes costs
    ``(n-1)/n * M`` for all-gather (M: output) and reduce-scatter (M: input), twice that for an
    all-reduce, filed under the smallest level holding the group (:meth:`Shape.level_of_ranks`).
    ``counts``, when given, receives the number of collectives per level (for latency terms);
    ``phases``, when given, receives ``phase -> level -> [bytes, collectives]`` for the phase of the
    step each collective runs in: ``forward`` (parameter gathers), ``backward`` (backward gathers
    and every gradient reduction, issued as units finish) and ``update`` (publishing the updated
    parameters and the clipping norm, after the backward); a level step over peer ranks (one per
    block of the step's smaller size) is filed as ``"<level>/peers"``: across nodes every hop of
    such a group crosses the link, and the ranks of a node share it, unlike a ring over whole nodes.
    """
    counts = counts if counts is not None else {}
    out: dict[str, int] = {}
    phase = "backward"

    def file(level: str, nbytes: int, times: int, stride: int = 1) -> None:
        out[level] = out.get(level, 0) + nbytes
        counts[level] = counts.get(level, 0) + times
        if phases is not None:  # a group of peers (one rank per block of ``stride``) is priced apart
            slot = phases.setdefault(phase, {}).setdefault(level + ("/peers" if stride > 1 else ""), [0, 0])
            slot[0] += nbytes
            slot[1] += times
    chain = levels.chain()
    s_p, s_g, s_o, s_b, s_d = (levels.size(k) for k in (*KINDS, "dp"))
    gb = GATHER_BYTES[gather_dtype]

    def add(small: int, big: int, op: str, nbytes: int, times: int = 1) -> None:
        if big // small > 1 and nbytes:
            file(shape.level_of_ranks(step_groups(shape, small, big)), times * _ring(op, nbytes, big // small), times,
                 small)

    def steps(lo: int, hi: int) -> list[tuple[int, int]]:
        used = [s for s in chain if lo <= s <= hi]
        return list(zip(used, used[1:]))

    def param_gather(padded: int, source: int, times: int) -> None:
        """A parameter all-gather from parts at block size ``source`` to the whole unit."""
        per = padded // source
        blocks = -(-per // INT8_BLOCK)
        for small, big in steps(1, source):
            if gather_dtype == "int8":  # int8 codes, then one fp32 scale per block of every part
                add(small, big, "all_gather", padded // small, times)
                add(small, big, "all_gather", 4 * blocks * (source // small), times)
            else:
                add(small, big, "all_gather", gb * padded // small, times)

    for padded in units:
        f = 4 * padded
        phase = "backward"
        if s_g > 1:  # every micro-step: reduce-scatter up to the grads level
            for small, big in steps(1, s_g):
                add(small, big, "reduce_scatter", f // small, grad_accum)
        for small, big in steps(s_g, s_o):  # once: on to the optim level
            add(small, big, "reduce_scatter", f // small)
        if s_d > s_o:  # the optim level's replicas: all-reduce across its peers
            file(shape.level_of_ranks(list(range(0, s_d, s_o))), _ring("all_reduce", f // s_o, s_d // s_o), 1, s_o)
        phase = "update"
        for small, big in steps(s_p, s_o):  # publish the updated master down to the params level
            add(small, big, "all_gather", f // small)
        phase = "forward"
        if s_p > 1:  # forward gathers, every micro-step
            param_gather(padded, s_p, grad_accum)
    phase = "backward"
    if s_p > 1 and s_b > 1:  # backward gathers from the backward copy
        for padded in (units if backward_units is None else backward_units):
            param_gather(padded, s_b, grad_accum)
    if clip and s_o > 1:
        phase = "update"
        file(shape.level_of_ranks(list(range(s_o))), _ring("all_reduce", 8, s_o), 0)
    return out
