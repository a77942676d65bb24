"""How much of the parameters ``offload.params = "nvme"`` keeps resident, and ``dtrain plan
memory``'s view of it (torch-free: the planner imports it without torch).

:class:`dtrain.offload.params.ParamTier` sizes its staging buffers and reports its resident
bytes with these functions, so the budget check, ``state_bytes_tier`` and the planner agree.
"""
from __future__ import annotations

from typing import Any

F32 = 4
ALIGN = 4096  # dtrain.offload.aio.ALIGN (that module imports torch)
STAGING_BUFFERS = 2  # aligned buffers a read or write holds while its I/O runs
STAGING_BYTES = 16 << 20  # per staging buffer: a part moves through it in pieces this large
STEP_SLOTS = 2  # parts read ahead for the optimizer step, resident until written back
GATHER_RESIDENT = 2  # the part being gathered and the one read ahead


def staging_bytes(part_bytes: list[int]) -> int:
    """Bytes of one staging buffer: 16 MiB, or the largest part (4096-aligned) if smaller."""
    return min(max((-(-n // ALIGN) * ALIGN for n in part_bytes), default=0), STAGING_BYTES)


def resident_bound(part_bytes: list[int]) -> int:
    """The most the tier holds in memory at once: the staging buffers and the resident parts (the
    one gathered, the one read ahead, STEP_SLOTS for the steps), capped at all the parts."""
    if not part_bytes:
        return 0
    return (STAGING_BUFFERS * staging_bytes(part_bytes)
            + min((GATHER_RESIDENT + STEP_SLOTS) * max(part_bytes), sum(part_bytes)))


def plan_param_tiers(config: Any, units: list[int], param_parts: int, tiers: dict[str, dict[str, int]],
                     show: bool = True) -> dict[str, dict[str, int]]:
    """``dtrain plan memory`` with ``offload.params = "nvme"``: move the parameter parts (``units``:
    padded element counts, split into ``param_parts``) from the device to ``nvme``, leaving what
    the tier keeps resident (:func:`resident_bound`), and print one line when ``show``."""
    import dtrain.offload.config  # noqa: F401 - registers the section the planner read as deferred

    cfg = config.offload
    if not cfg.enabled or cfg.params != "nvme":
        return tiers
    if config.zero.stage != 3:
        from dtrain.planner.errors import PlannerError

        raise PlannerError(f'offload.params = "nvme" needs zero.stage = 3 (each rank rests only its parameter '
                           f"part), not zero.stage = {config.zero.stage}")
    parts = [F32 * n // param_parts for n in units]
    at_rest, resident = sum(parts), resident_bound(parts)
    out = {t: dict(k) for t, k in tiers.items()}
    device = out.setdefault("device", {})
    device["params"] = max(0, device.get("params", 0) - at_rest) + resident
    out.setdefault("nvme", {})["params"] = at_rest
    if show:  # decimal GB, as the planner's table prints them
        print(f"offload.params = 'nvme': {len(parts)} units' parameter parts on nvme ({at_rest / 1e9:.3f} GB); "
              f"resident at most {resident / 1e9:.3f} GB (staging buffers and the parts being gathered or stepped)")
    return out
