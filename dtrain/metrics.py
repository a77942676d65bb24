"""The metrics stream: per-step JSONL on rank 0, memory probes, the progress bar, TensorBoard.

Also the storage-based measure of state (``storage_bytes``, ``layout_storage_bytes``): what the
benchmarks report for every framework and what the layouts' ``state_bytes`` formulas are tested
against.

The first line of a run is its header, ``{"event": "run", "run_id", "config", "git_rev",
"world_size", "started"}``. Then one line per step (docs/metrics.md): ``step, loss, step_time_s,
tokens_per_s, peak_rss_bytes`` (max over ranks), ``state_bytes {params, grads, optim}`` (max over
ranks), ``comm_bytes {level: bytes}`` (sent by the busiest rank this step), ``restarts`` and
``plugins``, with ``{"event": "restart" | "fault", ...}`` lines in between. The last line is a
summary with totals (``comm_bytes_total``: per level, the most any rank sent; sum this, not the
per-step maxima) and ``param_sha256`` of the consolidated fp32 parameters. Readers pick the
step records by their ``step`` key.

A new run replaces the file; a restart of the same run (``TORCHELASTIC_RESTART_COUNT`` > 0 and the
file's header has this run's id, ``DTRAIN_RUN_ID``) appends to it, so its restart events stay
with the steps before them. ``metrics.tensorboard = "dir"`` also writes every step's numbers as
TensorBoard scalars (tags ``loss``, ``state_bytes/params``, ``comm_bytes/node``, ...).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from dtrain.config import Config, ConfigError


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


def storage_bytes(tensors: Iterable[Any], seen: set[int] | None = None) -> int:
    """Bytes held by ``tensors``, each underlying (untyped) storage counted once.

    A view into a flat buffer is charged the whole buffer once, which is what the process holds;
    a freed storage (resized to 0) holds nothing. None, empty tensors and storages already in
    ``seen`` are skipped; DTensors are charged their local shard. Pass one ``seen`` to several
    calls so that a storage shared between kinds is charged to the first kind only.
    """
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None:
            continue
        to_local = getattr(t, "to_local", None)
        if callable(to_local):
            t = to_local()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if t.numel() == 0 or key == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def iter_tensors(obj: Any, _depth: int = 0) -> Iterable[torch.Tensor]:
    """Every tensor in nested dicts, lists, tuples and sets (depth-limited)."""
    if _depth > 6 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v, _depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from iter_tensors(v, _depth + 1)


def layout_storage_bytes(model: torch.nn.Module, layout: Any) -> dict[str, int]:
    """``state_bytes`` measured from storage, the way the benchmarks measure other frameworks.

    ``params``: the model's parameters and the layout's ``param`` and ``master`` shards;
    ``grads``: the parameters' ``.grad`` and the layout's ``grad`` shards; ``optim``: every tensor
    in the optimizer's state. Each storage is counted once, under the first kind that reaches it.
    ``LayoutPlugin.state_bytes`` computes the same figures from shapes (a formula); the two must
    agree (tests/dist/test_state_bytes.py).
    """
    seen: set[int] = set()

    def pieces(kind: str) -> list[torch.Tensor]:
        return [piece.tensor for shard in layout.shards(kind) for piece in shard.pieces]

    params = storage_bytes([*model.parameters(), *pieces("param"), *pieces("master")], seen)
    grads = storage_bytes([*(p.grad for p in model.parameters()), *pieces("grad")], seen)
    optim = storage_bytes(iter_tensors(dict(layout.optimizer.state)), seen)
    return {"params": params, "grads": grads, "optim": optim}


def run_id() -> str:
    """This run's id: the launcher's (stable across restarts), torchrun's, or a fresh one."""
    return os.environ.get("DTRAIN_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or f"run-{uuid.uuid4().hex[:12]}"


def git_rev(directory: str | None = None) -> str | None:
    """The commit checked out where the script lives (default: ``sys.argv[0]``'s directory), or None."""
    where = directory or os.path.dirname(os.path.abspath(sys.argv[0] if sys.argv and sys.argv[0] else "."))
    try:
        out = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip() if out.returncode == 0 else ""
    return rev or None


def header_run_id(path: str | os.PathLike) -> str | None:
    """The ``run_id`` of the header that starts the metrics file ``path``, or None."""
    try:
        with open(path) as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return first.get("run_id") if isinstance(first, dict) and first.get("event") == "run" else None


def is_step_record(record: dict[str, Any]) -> bool:
    """A per-step line (not the header, an event or the summary)."""
    return "step" in record and "event" not in record and not record.get("summary")


class MetricsWriter:
    """Writes the JSONL stream and the TensorBoard scalars (rank 0 only); draws one progress bar.

    ``config`` and ``world_size`` go into the run header (``config`` also switches on
    ``metrics.tensorboard``); without them the header has ``"config": null`` and the launch
    environment's world size.
    """

    def __init__(self, path: str | None, rank: int, progress: bool, total_steps: int | None, *,
                 config: Config | None = None, world_size: int | None = None) -> None:
        self.rank = rank
        self.file = None
        self.tensorboard = None
        if rank == 0 and path:
            self.file = self._open(path, config, world_size)
        if rank == 0 and config is not None and config.metrics.tensorboard:
            self.tensorboard = _TensorBoard(config.metrics.tensorboard)
        self.bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            # Drawn even off a terminal: under `dtrain launch` the launcher renders it in place.
            self.bar = tqdm(total=total_steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    @staticmethod
    def _open(path: str, config: Config | None, world_size: int | None) -> Any:
        from dtrain.launch.env import read_launch_env

        env = read_launch_env()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        this_run = run_id()
        if env.restart_count > 0 and header_run_id(path) == this_run:
            return open(path, "a", buffering=1)  # a restart of this run: continue its stream
        header = {"event": "run", "run_id": this_run, "config": config.to_dict() if config is not None else None,
                  "git_rev": git_rev(), "world_size": world_size or env.world_size, "started": time.time()}
        with open(path, "w") as f:
            f.write(json.dumps(header, default=str) + "\n")
        # Append mode: other ranks append fault events to the same file (dtrain/faults/inject.py).
        return open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, sort_keys=False) + "\n")
        if self.tensorboard is not None and is_step_record(record):
            self.tensorboard.write(record)
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
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


class _TensorBoard:
    """The step records' numbers as TensorBoard scalars (torch.utils.tensorboard)."""

    def __init__(self, logdir: str) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(f"metrics.tensorboard = {logdir!r} needs TensorBoard: pip install "
                              "'dtrain[tensorboard]' (or drop metrics.tensorboard)")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=logdir, flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


def scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """A step record's numbers as ``(tag, value)``: nested dicts joined with ``/``, ``step`` and
    non-numbers left out."""
    out: list[tuple[str, float]] = []
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out += scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and tag != "step":
            out.append((tag, float(value)))
    return out
