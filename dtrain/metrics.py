"""The metrics stream: per-step JSONL on rank 0, memory probes, the progress bar.

Line format (DESIGN.md): ``step, loss, step_time_s, tokens_per_s, peak_rss_bytes`` (max over
ranks), ``state_bytes {params, grads, optim}`` (max over ranks), ``comm_bytes {level: bytes}``
(sent by the busiest rank this step), ``restarts`` and ``plugins``. The last line is a summary
with totals and ``param_sha256`` of the consolidated fp32 parameters.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # non-Linux fallback: current RSS

    return psutil.Process().memory_info().rss


def param_sha256(params: dict[str, torch.Tensor]) -> str:
    """Hash of fp32 parameters in name order: equal hashes mean bit-identical parameters."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class MetricsWriter:
    """Writes the JSONL stream (rank 0 only) and draws one progress bar."""

    def __init__(self, path: str | None, rank: int, progress: bool, total_steps: int | None) -> None:
        self.rank = rank
        self.file = None
        if path and rank == 0:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)
        self.bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            # Drawn even off a terminal: under `dtrain launch` the launcher renders it in place.
            self.bar = tqdm(total=total_steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, sort_keys=False) + "\n")
        if self.bar is not None and "step" in record and not record.get("summary"):
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
