"""glibc's malloc policy for host memory: kept for reuse (ZeRO-3's regrown buffers) or mapped per
block (the offload tier's lean setting, ``offload.malloc_mmap_mb``).

One process-wide policy, settled in one place: a layout offers the *default*
(:func:`default_policy`, ZeRO's ``zero.malloc_keep_mb``), a plugin that needs another states it
(:func:`claim_policy`, the offload tier), and a claimed policy wins whichever call comes first.

ZeRO-3 frees every unit's gathered parameters once the unit has run and allocates them again for
the next use (and its gradient buffers once reduced), tens of MB per unit, every step. With glibc's
defaults those blocks come from the top of the heap and are given back to the kernel when the step
frees them (``M_TRIM_THRESHOLD`` follows the largest freed block), so the next step page-faults
every page again: measured on the ``bench`` GPT at world 2 on CPU, 35-60 thousand minor faults and
0.15-0.25 s of system time per step and rank (docs/hierarchical.md, "Host memory"). Keeping the
freed blocks in the heap makes the steady state fault-free; peak RSS is unchanged (the blocks
were resident at the peak anyway), RSS between steps stays at that peak.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

_claimed: str | None = None
"""Who claimed the policy (:func:`claim_policy`); None while only the default applies."""


def _mallopt(*settings: tuple[int, int]) -> bool:
    """``mallopt(param, value)`` for each pair; False off glibc or when glibc refuses one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all([bool(libc.mallopt(param, value)) for param, value in settings])
    except (OSError, AttributeError):
        return False


def keep_freed_memory(nbytes: int) -> bool:
    """Serve blocks below ``nbytes`` from the heap (``M_MMAP_THRESHOLD``) and give freed heap back to
    the kernel only beyond ``nbytes`` free at its top (``M_TRIM_THRESHOLD``). Process-wide; a later
    :func:`map_large_blocks` overrides the mmap threshold. False off glibc."""
    return _mallopt((M_MMAP_THRESHOLD, nbytes), (M_TRIM_THRESHOLD, nbytes))


def map_large_blocks(nbytes: int) -> bool:
    """Blocks of ``nbytes`` or more are mmapped on their own and returned to the OS when freed
    (``M_MMAP_THRESHOLD``). Fixing it also stops glibc from raising the threshold (up to 32 MB) each
    time a large block is freed, which leaves a step's temporaries cached in worker threads' arenas:
    lower peak RSS, at a page fault per page of every large temporary. The trim threshold goes back
    to glibc's default (128 KiB), undoing :func:`keep_freed_memory`'s. False off glibc."""
    return _mallopt((M_MMAP_THRESHOLD, nbytes), (M_TRIM_THRESHOLD, 128 * 1024))


def limit_arenas(count: int) -> bool:
    """At most ``count`` malloc arenas (``M_ARENA_MAX``): worker threads share them instead of each
    keeping its own free memory (glibc gives a thread that finds the main arena locked a new arena,
    up to 8 per core). Only arenas not yet created are affected, so call it before the threads
    allocate. False off glibc."""
    return _mallopt((M_ARENA_MAX, count))


def default_policy(apply: Callable[[], object]) -> bool:
    """Apply a layout's default policy unless a plugin has claimed the policy; True when applied."""
    if _claimed is not None:
        return False
    apply()
    return True


def claim_policy(owner: str, apply: Callable[[], object]) -> None:
    """``owner`` states the process's policy: ``apply`` runs now (after any default, so its settings
    win) and later defaults are skipped."""
    global _claimed
    _claimed = owner
    apply()
