"""Choosing what goes where: a small cost model that places each unit's optimizer state resident
(on the device), on host memory or on NVMe from a memory budget and a one-step profile.

Pure functions, no torch: ``dtrain plan memory`` (and a user) can call :func:`choose_placement`
with sizes from the layout's descriptors and timings from one profiled step.

The model (after Fuyou/LoHan's swap choice, arXiv 2403.06504). A unit stepped inside backward has
a *hiding window*: the backward time left after its gradient is reduced (units reduced first,
the last layers, have the most). Keeping its state off the device costs transfer time: host
copies at ``host_gbps``, NVMe reads and writes at ``nvme_read_gbps``/``nvme_write_gbps``. What
is not hidden is *exposed* and adds to the step. Greedy rule:

1. Every unit starts off the device: on host memory while ``host_budget`` lasts (units with the
   shortest hiding window first), else on NVMe (then the staging pool is charged to the device
   budget: the NVMe tier streams each unit in chunks, so the pool is ``pool_sets`` buffer sets of
   one chunk; see :func:`staging_shape`). Units coming back to the device leave room for a pool
   of ``set_reserve_bytes`` sets (full-size chunks by default); what room is left after them
   grows the chunks up to ``set_cap_bytes`` per set.
2. Units are brought back to the device in order of exposed seconds saved per byte, while the
   device budget (``budget - resident``, resident = parameters + gradients) allows.
3. Budget still left keeps more units resident, shortest hiding window first (resident state is
   never slower; the model's windows are estimates).

Before any step is profiled (the tier lays itself out before step 1, and ``dtrain plan memory``
has no profile), :func:`nominal_profiles` assumes backward lasts as long as moving the whole
state in and out once: the units reduced last (the first layers) then have the least window and
stay resident first.

The result says, per unit, the tier and its exposed seconds, and the predicted step time
(compute + exposed transfer time). It is a model: it assumes transfers of different units do not
contend and the optimizer keeps pace with backward (``optim_s`` per unit below its window).
"""
from __future__ import annotations

from dataclasses import dataclass, field

GB = 2**30


@dataclass(frozen=True)
class UnitProfile:
    """One unit as this rank sees it, from the descriptors and one profiled step."""

    name: str
    state_bytes: int
    """Element-wise optimizer state of this rank's part (e.g. Adam: 2 x 4 bytes per element)."""
    window_s: float
    """Backward time left after this unit's gradient is reduced (its hiding window)."""
    optim_s: float = 0.0
    """The optimizer's compute time for this unit."""


@dataclass(frozen=True)
class Placement:
    tiers: dict[str, str]
    """Unit name -> "device" | "host" | "nvme"."""
    exposed_s: dict[str, float]
    device_bytes: int
    """Resident state + optimizer state kept on the device + the NVMe staging pool."""
    host_bytes: int
    nvme_bytes: int
    step_s: float
    """Predicted step time: ``compute_s`` + every unit's exposed transfer time."""
    notes: list[str] = field(default_factory=list)


GRAD_WINDOW_UNITS = 3
"""Units' gradient parts the budget counts under the gradient window (docs/offload.md): at one time
a step holds the units reported and not yet stepped (backward waits while they exceed the largest
unit), the unit backward is filling, and one filled early and reported last (a root unit whose
first gradients come at backward's start, e.g. a final norm beside a tied embedding)."""


def grad_window_applies(config) -> bool:
    """Whether the budget counts the gradients as a window: a budget is set, and every unit is
    stepped inside backward and its gradient can be freed after (overlap on, no clipping, one
    micro-batch, the batch-mean loss, ZeRO-2/3: split gradients). The plugin also needs the layout
    to accept ``release_grad``. Without a budget nothing is held back (no wait)."""
    train, off = config.train, config.offload
    return (off.memory_budget_gb is not None and off.overlap and train.clip_grad_norm is None
            and train.grad_accum == 1 and train.loss_norm == "batch" and config.zero.stage >= 2)


def grad_window_bytes(unit_grad_bytes: list[int]) -> int:
    """The gradient bytes the budget counts under the window: the largest units' parts."""
    return sum(sorted(unit_grad_bytes, reverse=True)[:GRAD_WINDOW_UNITS])


def transfer_s(state_bytes: int, tier: str, host_gbps: float, nvme_read_gbps: float, nvme_write_gbps: float) -> float:
    """Seconds to bring a unit's state in and write it back from ``tier``."""
    if tier == "device":
        return 0.0
    if tier == "host":
        return 2 * state_bytes / (host_gbps * GB)
    return state_bytes / (nvme_read_gbps * GB) + state_bytes / (nvme_write_gbps * GB)



POOL_SETS = 4
"""Staging buffer sets of the NVMe tier: read chunk i+1 (and i+2), step chunk i, write chunk i-1."""
CHUNK_BYTES_PER_KEY = 4 << 20
"""The chunk the NVMe tier streams, per state key (one 4 MiB read or write per key), and the one
the placement keeps room for before it keeps units' state resident. Each chunk costs a fixed
~1-2 ms of hand-offs and I/O completion on a busy host beside its transfer, so smaller chunks
starve the pipeline: with 1 MiB chunks kept room for (and more units resident) the overlapped
step was 1.05-1.5x slower (docs/offload.md, "Chunks and the staging pool")."""
MIN_CHUNK_BYTES_PER_KEY = 64 << 10
"""The smallest chunk worth a pipeline stage; below it the pool has fewer sets."""
ALIGN = 4096  # dtrain.offload.aio.ALIGN (this module stays torch-free)
F32 = 4


def staging_shape(room_bytes: int | None, keys: int, largest_unit_elems: int,
                  pool_sets: int = POOL_SETS) -> tuple[int, int]:
    """``(buffer sets, elements per chunk)`` of the NVMe tier's staging pool: ``pool_sets`` sets of
    ``keys`` x 4096-aligned chunk strides in ``room_bytes`` (None: no budget, full-size chunks),
    chunks of at most :data:`CHUNK_BYTES_PER_KEY` and never larger than the largest unit.
    Smaller chunks before fewer sets (the pipeline needs the sets; the disk does not need large
    calls); a multiple of 1024 elements, so every chunk starts 4096-aligned in its unit's file.
    Raises ValueError when not even one set of the smallest chunk fits."""
    unit_elems = -(-max(largest_unit_elems, 1) // 1024) * 1024
    cap = min(CHUNK_BYTES_PER_KEY // F32, unit_elems)
    if room_bytes is None:
        return pool_sets, cap
    for sets in range(pool_sets, 0, -1):
        elems = min(cap, room_bytes // (sets * keys * ALIGN) * 1024)
        if elems >= min(cap, MIN_CHUNK_BYTES_PER_KEY // F32) or (sets == 1 and elems >= 1024):
            return sets, elems
    raise ValueError(f"{room_bytes} bytes cannot hold one staging buffer set ({keys} x {ALIGN} bytes)")


def _pool_bytes(units: list[UnitProfile], tiers: dict[str, str], pool_sets: int, set_cap_bytes: int) -> int:
    """The staging pool the NVMe units want: ``pool_sets`` chunk-sized buffer sets (a set at most
    ``set_cap_bytes``, at most the largest NVMe unit; no more sets than chunks)."""
    on_nvme = [u.state_bytes for u in units if tiers[u.name] == "nvme"]
    if not on_nvme:
        return 0
    one = min(max(on_nvme), set_cap_bytes)
    return min(pool_sets, -(-sum(on_nvme) // one)) * one


def choose_placement(units: list[UnitProfile], budget_bytes: int, resident_bytes: int, compute_s: float, *,
                     host_budget_bytes: int = 0, host_gbps: float = 10.0, nvme_read_gbps: float = 2.0,
                     nvme_write_gbps: float = 1.0, pool_sets: int = POOL_SETS,
                     set_cap_bytes: int = 2 * CHUNK_BYTES_PER_KEY, set_reserve_bytes: int | None = None,
                     min_set_bytes: int = 2 * MIN_CHUNK_BYTES_PER_KEY) -> Placement:
    """Tier per unit under ``budget_bytes`` of device memory (see the module docstring).
    ``set_cap_bytes``/``set_reserve_bytes``/``min_set_bytes``: the largest staging buffer set, the
    one kept room for (None: the largest) and the smallest (all state keys of one chunk; defaults:
    Adam's two keys).

    Raises ValueError when even everything off the device does not fit: the message names the
    minimum budget (resident state plus the smallest NVMe staging buffer set)."""
    def exposed(u: UnitProfile, tier: str) -> float:
        return max(0.0, transfer_s(u.state_bytes, tier, host_gbps, nvme_read_gbps, nvme_write_gbps) + u.optim_s
                   - u.window_s) if tier != "device" else max(0.0, u.optim_s - u.window_s)

    tiers: dict[str, str] = {}
    host_left = host_budget_bytes
    for u in sorted(units, key=lambda u: u.window_s):  # least hiding window first: they gain most from host
        if u.state_bytes <= host_left:
            tiers[u.name], host_left = "host", host_left - u.state_bytes
        else:
            tiers[u.name] = "nvme"

    smallest = min(min_set_bytes, max((u.state_bytes for u in units), default=0))
    minimum = resident_bytes + (smallest if "nvme" in tiers.values() else 0)
    if budget_bytes < minimum:
        raise ValueError(f"a device budget of {budget_bytes / GB:.4f} GB is below the minimum {minimum / GB:.4f} GB "
                         f"(parameters and gradients + the smallest staging buffer set)")
    notes = []
    set_reserve_bytes = set_cap_bytes if set_reserve_bytes is None else set_reserve_bytes
    reserve_sets = pool_sets  # fewer sets to keep room for when even the reserved pool does not fit
    while reserve_sets > 1 and _pool_bytes(units, tiers, reserve_sets, set_reserve_bytes) + resident_bytes > budget_bytes:
        reserve_sets -= 1

    def pool(t: dict[str, str]) -> int:  # the pool kept room for while units come back
        return _pool_bytes(units, t, reserve_sets, set_reserve_bytes)

    if _pool_bytes(units, tiers, pool_sets, set_cap_bytes) + resident_bytes > budget_bytes:
        notes.append(f"staging pool cut to {(budget_bytes - resident_bytes) / 2**20:.1f} MiB (smaller chunks) "
                     f"to fit the budget")
    device_used = resident_bytes
    gains = sorted((u for u in units),
                   key=lambda u: -(exposed(u, tiers[u.name]) - exposed(u, "device")) / max(u.state_bytes, 1))
    for u in gains:
        if exposed(u, tiers[u.name]) <= exposed(u, "device"):
            continue
        trial = dict(tiers, **{u.name: "device"})
        if device_used + u.state_bytes + pool(trial) <= budget_bytes:
            tiers = trial
            device_used += u.state_bytes
    for u in sorted(units, key=lambda u: u.window_s):
        trial = dict(tiers, **{u.name: "device"})
        if tiers[u.name] != "device" and device_used + u.state_bytes + pool(trial) <= budget_bytes:
            tiers = trial
            device_used += u.state_bytes
    exposed_s = {u.name: exposed(u, tiers[u.name]) for u in units}
    by = lambda tier: sum(u.state_bytes for u in units if tiers[u.name] == tier)  # noqa: E731
    staging = min(budget_bytes - device_used, _pool_bytes(units, tiers, pool_sets, set_cap_bytes))
    return Placement(tiers, exposed_s, device_used + staging, by("host"), by("nvme"),
                     compute_s + sum(exposed_s.values()), notes)


def uniform_profiles(unit_bytes: list[tuple[str, int]], backward_s: float, optim_s: float) -> list[UnitProfile]:
    """Profiles from a one-step measurement when per-unit timings are not recorded: units are
    reduced in the given order (the order backward reports them), each window is the backward
    time after it in proportion to the bytes still to come, and the optimizer time is split by size."""
    total = sum(b for _, b in unit_bytes) or 1
    out, done = [], 0
    for name, b in unit_bytes:
        done += b
        out.append(UnitProfile(name, b, backward_s * (1 - done / total), optim_s * b / total))
    return out


def nominal_profiles(unit_bytes_in_reduction_order: list[tuple[str, int]], nvme_read_gbps: float = 2.0,
                     nvme_write_gbps: float = 1.0) -> list[UnitProfile]:
    """Profiles before any step ran: backward assumed as long as reading and writing the whole
    state once at the given bandwidths (the break-even case the overlap is built for), windows
    split by bytes still to be reduced, no optimizer time."""
    total = sum(b for _, b in unit_bytes_in_reduction_order)
    backward_s = transfer_s(total, "nvme", 1.0, nvme_read_gbps, nvme_write_gbps)
    return uniform_profiles(unit_bytes_in_reduction_order, backward_s, 0.0)


def place_units(unit_bytes_in_reduction_order: list[tuple[str, int]], tier: str, budget_bytes: int | None,
                resident_bytes: int, pool_sets: int = POOL_SETS, set_cap_bytes: int = 2 * CHUNK_BYTES_PER_KEY,
                set_reserve_bytes: int | None = None, min_set_bytes: int = 2 * MIN_CHUNK_BYTES_PER_KEY) -> Placement:
    """The tier's per-unit choice as the ``offload`` plugin applies it and ``dtrain plan memory``
    shows it: every unit on ``tier`` ("host" or "nvme") when there is no budget, else
    :func:`choose_placement` over :func:`nominal_profiles` (units kept resident while the budget
    allows). ``tier = "host"`` offers host memory without limit."""
    units = nominal_profiles(unit_bytes_in_reduction_order)
    if budget_bytes is None:
        tiers = {u.name: tier for u in units}
        by = lambda t: sum(u.state_bytes for u in units if tiers[u.name] == t)  # noqa: E731
        return Placement(tiers, {u.name: 0.0 for u in units},
                         resident_bytes + _pool_bytes(units, tiers, pool_sets, set_cap_bytes),
                         by("host"), by("nvme"), 0.0)
    host = sum(u.state_bytes for u in units) if tier == "host" else 0
    return choose_placement(units, budget_bytes, resident_bytes, 0.0, host_budget_bytes=host, pool_sets=pool_sets,
                            set_cap_bytes=set_cap_bytes, set_reserve_bytes=set_reserve_bytes,
                            min_set_bytes=min_set_bytes)


def plan_memory_tiers(config, units: list[int], optim_parts: int, tiers: dict[str, dict[str, int]],
                      show: bool = True, grad_parts: int = 1) -> dict[str, dict[str, int]]:
    """``dtrain plan memory`` with an enabled ``offload`` section: re-split the optimizer state of
    ``tiers`` (bytes per tier and kind, all on the device) the way the plugin places it, per unit
    (``units``: element counts in ZeRO-3's order, the root last; ``optim_parts``: ranks sharing
    the optimizer state; ``grad_parts``: ranks sharing the gradients), and print the per-unit
    choice when ``show``."""
    import dtrain.offload.config  # noqa: F401 - registers the section the planner read as deferred

    cfg = config.offload
    if not cfg.enabled or cfg.optim == "device":
        return tiers
    per_unit = [(f"layers.{i}" if i < len(units) - 1 else "<root>", 8 * n // optim_parts)
                for i, n in enumerate(units)]
    device = tiers.get("device", {})
    resident = device.get("params", 0) + device.get("grads", 0)
    budget = None if cfg.memory_budget_gb is None else int(cfg.memory_budget_gb * GB)
    try:
        try:
            placement = place_units(list(reversed(per_unit)), cfg.optim, budget, resident)
        except ValueError:  # too small for every gradient: a window of them, where the steps allow one
            window = grad_window_bytes([4 * n // grad_parts for n in units])
            if not (grad_window_applies(config) and cfg.optim == "nvme" and window < device.get("grads", 0)):
                raise
            tiers = {t: dict(k) for t, k in tiers.items()}
            device = tiers["device"]
            device["grads"] = window
            resident = device.get("params", 0) + window
            placement = place_units(list(reversed(per_unit)), cfg.optim, budget, resident)
            if show:
                print(f"offload: the budget is too small for every gradient; the steps run inside backward, so "
                      f"it counts the {GRAD_WINDOW_UNITS} largest units' at once ({window / 1e9:.3f} GB)")
    except ValueError as exc:
        from dtrain.planner.errors import PlannerError

        raise PlannerError(f"offload.memory_budget_gb = {cfg.memory_budget_gb}: {exc}") from None
    kept = sum(b for name, b in per_unit if placement.tiers[name] == "device")
    out = {t: dict(k) for t, k in tiers.items()}
    off = placement.nvme_bytes if cfg.optim == "nvme" else placement.host_bytes
    pool = placement.device_bytes - resident - kept
    out.setdefault("device", {})["optim"] = kept + pool  # unpadded per-unit bytes, as the plugin counts them
    out.setdefault(cfg.optim, {})["optim"] = off
    if show:  # decimal GB, as the planner's table prints them
        names = [name for name, _ in per_unit if placement.tiers[name] == "device"]
        print(f"offload.optim = {cfg.optim!r}, offload.memory_budget_gb = {cfg.memory_budget_gb}: "
              f"{len(names)} of {len(per_unit)} units' optimizer state resident ({kept / 1e9:.3f} GB"
              f"{': ' + ', '.join(names[:8]) + (' ...' if len(names) > 8 else '') if names else ''}), "
              f"{sum(1 for t in placement.tiers.values() if t == cfg.optim)} on {cfg.optim} ({off / 1e9:.3f} GB), "
              f"staging pool {pool / 1e9:.3f} GB")
        for note in placement.notes:
            print(f"  {note}")
    return out
