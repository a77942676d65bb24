"""One rank of the snapshot benchmark's disk-checkpoint reference points (benchmarks/snapshot.py).

    dtrain launch --nodes 2 --nproc 2 benchmarks/_snapshot_worker.py --method torch_save \\
        --save-dir /tmp/x -- --steps 40 --set zero.stage=3 --metrics m.jsonl

Owns: the ``bench_save`` plugin that, after every ``engine.train_step``, saves this rank's exact
snapshot state (``dtrain.checkpoint.capture(engine, all_units=True, with_extra=True)``, handed over as views of
the live tensors, plus the frozen parameters and buffers) with

* ``torch_save``: synchronous ``torch.save`` to ``<save-dir>/rank<R>.pt`` (written to a temporary
  name, then renamed, as a checkpoint must be; no fsync, which favours ``torch.save``);
* ``dcp_async``: ``torch.distributed.checkpoint.async_save`` into ``<save-dir>/dcp/step-<S>``,
  waiting for the previous save's future before starting the next one (as its documentation
  requires), on a dedicated gloo process group (its background thread runs collectives).

and one in-run A/B mode of dtrain's own snapshots:

* ``snapshot_ab``: ``snapshot.enabled = true`` (set by the caller), but the snapshot plugin acts
  only in alternate windows of ``--ab-window`` steps (``(step // window) % 2 == 0``: "on"). Steps
  of "on" windows are snapshotted every step, steps of "off" windows not at all, so one run
  measures both under the same machine conditions, a few seconds apart (see
  :func:`ab_window`). The per-step ``snapshot_step`` metric says which steps were captured.

Training itself is examples/train_gpt.py's ``main`` unchanged (same model, optimizer, schedule and
batches), so the engine writes the same metrics JSONL as every other variant. The plugin reports,
in each step's ``plugins`` object, ``snapshot_block_s`` (the whole blocking part: capture,
materialisation and the save call, including any wait for the previous save) and
``save_call_s`` (the save call and wait alone), ``snapshot_bytes`` and ``save_method``.

Only the save method's own work is timed: ``snapshot_block_s`` (= ``save_call_s``) is the
``torch.save`` call, or DCP's wait for the previous save plus its ``async_save`` call (which stages
a copy). Handing over the state (dtrain's zero-copy ``capture``, views of the live tensors, no
``.clone()``) is reported separately as ``prepare_s``; it is also inside the engine's
``step_time_s``, being a plugin hook, and is a few hundred microseconds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from dtrain.checkpoint import capture  # noqa: E402
from dtrain.plugins.base import Plugin, register  # noqa: E402

METHODS = ("torch_save", "dcp_async", "snapshot_ab")
_SETTINGS: dict[str, str] = {}
"""``method`` and ``save_dir`` for this process; the plugin is enabled only when they are set."""


def ab_window(step: int, window: int) -> tuple[bool, int]:
    """Whether ``step`` lies in an "on" window of ``snapshot_ab``, and its position in its window."""
    return (step // window) % 2 == 0, step % window


def gate_snapshots(window: int) -> None:
    """Make dtrain's snapshot plugin act only on the steps of "on" windows (``snapshot_ab``)."""
    from dtrain.plugins.snapshot import SnapshotPlugin

    every_step = SnapshotPlugin.after_step

    def after_step(self: Any, step: int) -> None:
        if ab_window(step, window)[0]:
            every_step(self, step)
        else:
            self.block_s = 0.0

    SnapshotPlugin.after_step = after_step  # type: ignore[method-assign]


def rank_state(engine: Any) -> dict[str, torch.Tensor]:
    """This rank's snapshot state (what a snapshot blob holds) as views of the live tensors, no
    copies: a flat made of several pieces is stored piece by piece (``<key>@<offset>``). What to
    save is this handover; the copies and writes are the save method's own work, which alone is
    timed (torch.save serialises synchronously; DCP's async_save stages its own copy)."""
    state = capture(engine, all_units=True, with_extra=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, flat in state.tensors.items():
        whole = len(flat.pieces) == 1 and flat.pieces[0][0] == 0 and flat.pieces[0][1].numel() == flat.numel
        if whole:
            source = flat.pieces[0][1]
            tensors[key] = source.view(flat.shape) if flat.shape is not None else source
        else:
            tensors.update({f"{key}@{offset}": source for offset, source in flat.pieces})
    tensors.update({f"extra.{k}": v.detach() for k, v in state.extra.items()})
    return tensors


def torch_save_atomic(tensors: dict[str, torch.Tensor], path: Path, fsync: bool = False) -> None:
    """``torch.save`` to a temporary name (optionally fsync-ed), then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(tensors, fh)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


@register
class BenchSavePlugin(Plugin):
    """Saves the rank's state to disk after every step and reports how long training blocked."""

    name: ClassVar[str] = "bench_save"
    slot: ClassVar[str] = "bench_save"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return _SETTINGS.get("method") in ("torch_save", "dcp_async")

    def setup(self, engine: Any) -> None:
        super().setup(engine)
        self.method = _SETTINGS["method"]
        self.rank = engine.runtime.rank
        self.dir = Path(_SETTINGS["save_dir"])
        self.block_s = self.prepare_s = 0.0
        self.nbytes = 0
        self.future: Any = None
        self.previous: list[Path] = []
        self.group: Any = None
        if self.method == "dcp_async":  # every rank calls new_group, in the same order
            self.group = torch.distributed.new_group(backend="gloo")

    def after_step(self, step: int) -> None:
        start = time.perf_counter()
        tensors = rank_state(self.engine)  # views: dtrain's capture, not the save method's work
        call = time.perf_counter()
        if self.method == "torch_save":
            torch_save_atomic(tensors, self.dir / f"rank{self.rank}.pt")
        else:
            import torch.distributed.checkpoint as dcp

            if self.future is not None:
                self.future.result()
            target = self.dir / "dcp" / f"step-{step:06d}"
            self.future = dcp.async_save({f"rank{self.rank}/{k}": v for k, v in tensors.items()},
                                         checkpoint_id=str(target), process_group=self.group)
        end = time.perf_counter()
        self.prepare_s, self.block_s = call - start, end - call
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.method == "dcp_async":
            self._prune(target)

    def _prune(self, newest: Path) -> None:
        """Delete checkpoints older than the previous one (rank 0; outside the timed part)."""
        self.previous.append(newest)
        while len(self.previous) > 2:
            old = self.previous.pop(0)
            if self.rank == 0:
                shutil.rmtree(old, ignore_errors=True)

    def metrics(self) -> dict[str, Any]:
        return {"snapshot_block_s": self.block_s, "save_call_s": self.block_s, "prepare_s": self.prepare_s,
                "snapshot_bytes": self.nbytes, "save_method": self.method}

    def teardown(self) -> None:
        if self.future is not None:
            self.future.result()
            self.future = None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--save-dir", required=True, help="directory for the checkpoints (created)")
    p.add_argument("--ab-window", type=int, default=8, help="snapshot_ab: steps per on/off window")
    own = p.parse_args(argv[:split])
    torch.set_num_threads(1)
    if own.method == "snapshot_ab":
        gate_snapshots(own.ab_window)
    save_dir = Path(own.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    _SETTINGS.update(method=own.method, save_dir=str(save_dir))
    from train_gpt import main as train_main

    return train_main(argv[split + 1:])


if __name__ == "__main__":
    raise SystemExit(main())
