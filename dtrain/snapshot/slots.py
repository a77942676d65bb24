"""Slot files mapped into memory and kept mapped from step to step.

A rank writes its blob into one of its slot files (/dev/shm) every snapshot, and the node's
snapshot process reads every slot it codes. Mapping a file afresh each time faults in every
page again, which on a VM costs about as much as touching the data; so both keep their mappings
(:class:`SlotMaps`), mapped again only when a file grew (slots only grow) or was replaced (a new
inode: a slot rebuilt after a node loss). Torch-free: the snapshot process uses it too.
"""
from __future__ import annotations

import mmap
import os
import threading

__all__ = ["SlotMaps"]


class SlotMaps:
    """Mappings of slot files by path: read-only, or writable (``writable``)."""

    def __init__(self, writable: bool = False) -> None:
        self.writable = writable
        self._lock = threading.Lock()
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}  # path -> (inode, mapping)
        self._retired: list[mmap.mmap] = []  # replaced mappings a view may still use

    def view(self, path: str, nbytes: int) -> memoryview | None:
        """The first ``nbytes`` of ``path``; None if the file is shorter than that."""
        if nbytes == 0:
            return memoryview(bytearray() if self.writable else b"")
        st = os.stat(path)
        if st.st_size < nbytes:
            return None
        with self._lock:
            cached = self._maps.get(path)
            if cached is None or cached[0] != st.st_ino or len(cached[1]) < nbytes:
                if cached is not None:
                    self._retired.append(cached[1])
                with open(path, "r+b" if self.writable else "rb") as f:
                    prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
                    cached = self._maps[path] = (st.st_ino, mmap.mmap(f.fileno(), st.st_size, prot=prot))
                self._retired = [mm for mm in self._retired if not _try_close(mm)]
            return memoryview(cached[1])[:nbytes]

    def close(self) -> None:
        with self._lock:
            for mm in [m for _, m in self._maps.values()] + self._retired:
                _try_close(mm)
            self._maps.clear()
            self._retired.clear()


def _try_close(mm: mmap.mmap) -> bool:
    try:
        mm.close()
        return True
    except BufferError:  # a view of it is still in use
        return False
