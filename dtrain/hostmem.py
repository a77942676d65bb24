"""How freed host memory is kept for reuse (glibc's malloc policy), for layouts that regrow buffers.

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


def keep_freed_memory(nbytes: int) -> bool:
    """Serve blocks below ``nbytes`` from the heap (``M_MMAP_THRESHOLD``) and give freed heap back to
    the kernel only beyond ``nbytes`` free at its top (``M_TRIM_THRESHOLD``). Process-wide; a later
    ``mallopt`` (``offload.malloc_mmap_mb``) overrides the mmap threshold. False off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes)) and bool(libc.mallopt(M_TRIM_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False
