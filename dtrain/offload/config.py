"""The ``offload`` section (torch-free, so the launcher can check it before any rank starts).

:class:`dtrain.offload.plugin.OffloadPlugin` declares it as its nested ``Config``; docs/offload.md
says what each key does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dtrain.config import register_section, require

TierName = Literal["device", "host", "nvme"]


@dataclass(kw_only=True)
class OffloadConfig:
    """Where the optimizer state and the parameters rest, and the optimizer stepped inside backward."""

    enabled: bool = False
    optim: TierName = "host"
    """Where the element-wise optimizer state (Adam's moments) rests between steps."""
    params: TierName = "device"
    """Where the parameters rest. "device" moves nothing; "host" is accepted on a CPU device (the
    same memory); "nvme" (ZeRO-3, CPU device): each unit's parameter part rests in a file under
    ``dir`` and is read for its gathers and its optimizer step (dtrain/offload/params.py)."""
    dir: str | None = None
    """Directory for the NVMe tier's state files (one sub-directory per run and rank)."""
    memory_budget_gb: float | None = None
    """Per-rank budget for resident training state (parameters, gradients, state kept in memory and
    the NVMe staging buffers). None: no check, three staging buffer sets."""
    io_threads: int = 2
    """Threads issuing the NVMe tier's reads and writes (preadv/pwritev), per direction."""
    io: Literal["auto", "async_io", "threads"] = "auto"
    """The NVMe tier's I/O engine: "threads" (a pool of preadv/pwritev calls), "async_io"
    (DeepSpeed's libaio op; one UsageError line where it cannot run) or "auto": the op where it
    loads and a start-up probe on ``dir`` finds it faster than the pool, else the pool
    (dtrain/offload/aio.py)."""
    cpu_adam: bool = False
    """Step with DeepSpeed's DeepSpeedCPUAdam instead of the factory's torch Adam/AdamW (same
    hyperparameters; equal within a tolerance, not bit-identical). Its op must load and the
    optimizer must be Adam/AdamW, else one UsageError line at start-up."""
    malloc_mmap_mb: float = 0.0
    """glibc: allocations of at least this many MB are mapped and unmapped on their own, so freed
    step temporaries go back to the OS instead of staying in a thread's arena. Lower peak RSS
    (~50-70 MB on the benchmark) for a page fault per page of every large temporary (~0.15 s of a
    0.3 s step there). Process-wide; 0 (the default) leaves glibc's own dynamic threshold."""
    overlap: bool = True
    """Step each unit while backward continues; False is ZeRO-Infinity's order, for comparison: every
    unit read, stepped and written after backward (chunks pipelined among themselves), all writes
    done before the step returns (docs/offload.md)."""

    def validate(self) -> None:
        require(self.optim in ("device", "host", "nvme"), "offload.optim", self.optim, '"device", "host" or "nvme"')
        require(self.params in ("device", "host", "nvme"), "offload.params", self.params, '"device", "host" or "nvme"')
        require(self.malloc_mmap_mb >= 0, "offload.malloc_mmap_mb", self.malloc_mmap_mb, "a number of MB >= 0")
        require(self.io in ("auto", "async_io", "threads"), "offload.io", self.io, '"auto", "async_io" or "threads"')
        require(self.io_threads >= 1, "offload.io_threads", self.io_threads, "an integer >= 1")
        require(self.memory_budget_gb is None or self.memory_budget_gb > 0, "offload.memory_budget_gb",
                self.memory_budget_gb, "a positive number of GB, or omit it")
        require(not (self.enabled and "nvme" in (self.optim, self.params) and not self.dir), "offload.dir", self.dir,
                'a directory path when offload.optim or offload.params is "nvme"')


register_section("offload", OffloadConfig)
