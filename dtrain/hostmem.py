"""glibc's malloc policy for host memory: kept for reuse (ZeRO-3's regrown buffers) or mapped per
block (the offload tier's lean setting, ``offload.malloc_mmap_mb``).

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

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


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
    lower peak RSS, at a page fault per page of every large temporary. False off glibc."""
    return _mallopt((M_MMAP_THRESHOLD, nbytes))
