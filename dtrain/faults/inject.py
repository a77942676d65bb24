"""Fire faults inside the training processes, once per run, and record them as metrics events.

Each fault leaves a *fired marker* in the job's run directory (``faults/<index>.json``, with the
attempt that fired it and the time), so a restarted group does not fire it again while every rank
of the attempt that fired it still does its part (a node loss kills all ranks of the node). The
newest marker also tells the restarted engine why it restarted and when the failure happened.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dtrain.faults.spec import Fault, FaultSpecError, check_fits, expand_chaos, parse_all

__all__ = ["FaultInjector", "last_fault"]


def _markers(run: Path) -> Path:
    from dtrain.runstate import private_dir

    return private_dir(run / "faults", parents=False)


def last_fault(run: Path) -> dict[str, Any] | None:
    """The most recently fired fault of this run (its marker), or None."""
    newest = None
    for p in (run / "faults").glob("*.json"):
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if newest is None or m["time"] > newest["time"]:
            newest = m
    return newest


class FaultInjector:
    """The faults of one run as seen by one rank; :meth:`after_step` fires the due ones."""

    def __init__(self, specs: list[str], engine: Any) -> None:
        self.engine = engine
        shape = engine.comm.topology.shape
        self.rank, self.world, self.node, self.nodes = shape.rank, shape.world_size, shape.node_rank, shape.nodes
        self.attempt = engine.runtime.env.restart_count
        faults = parse_all(specs)
        check_fits(faults, self.world, self.nodes, engine.total_steps)
        snapshots = engine.config.snapshot.enabled
        self.faults: list[Fault] = []
        for f in faults:
            if f.kind == "chaos":
                if engine.total_steps is None:
                    raise FaultSpecError("--inject chaos needs the run's step count (pass total_steps to dtrain.wrap)")
                self.faults += expand_chaos(f, self.world, self.nodes, engine.total_steps, snapshots,
                                            first_index=100 * (f.index + 1))
            elif f.kind != "net":  # the launcher shapes the network
                self.faults.append(f)
        if any(f.kind == "corrupt" for f in self.faults) and not snapshots:
            raise FaultSpecError("--inject corrupt:... needs snapshot.enabled = true (it damages a snapshot shard)")
        from dtrain.snapshot.client import run_dir

        self.run = run_dir(engine.config.snapshot.run_id)
        self._slowed: set[int] = set()

    @property
    def active(self) -> bool:
        return bool(self.faults)

    def after_step(self, step: int) -> None:
        for f in self.faults:
            if f.kind == "slow" and f.get("rank") == self.rank and step >= f.get("step"):
                if f.index not in self._slowed:  # marker and event once, not a file per step
                    self._slowed.add(f.index)
                    self._claim(f, step)
                time.sleep(f.get("ms") / 1000.0)
            elif f.kind != "slow" and f.get("step") == step and self._mine(f) and self._claim(f, step):
                self._fire(f, step)

    def _mine(self, f: Fault) -> bool:
        return f.get("node") == self.node if f.kind == "node-loss" else f.get("rank") == self.rank

    def _claim(self, f: Fault, step: int) -> bool:
        """True when this attempt fires ``f`` (first claim writes the marker and the event)."""
        path = _markers(self.run) / f"{f.index}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                return json.loads(path.read_text())["attempt"] == self.attempt and f.kind != "slow"
            except (OSError, ValueError, KeyError):
                return False
        marker = {"index": f.index, "spec": f.describe(), "kind": f.kind, "rank": self.rank, "node": self.node,
                  "step": step, "attempt": self.attempt, "time": time.time()}
        with os.fdopen(fd, "w") as out:
            json.dump(marker, out)
        self._event({"event": "fault", **{k: marker[k] for k in ("spec", "kind", "rank", "node", "step")},
                     "time": marker["time"]})
        print(f"dtrain: injecting {f.describe()} on rank {self.rank} after step {step}", file=sys.stderr,
              flush=True)
        return True

    def _event(self, record: dict[str, Any]) -> None:
        """Append an event line to the metrics stream (one write: atomic next to rank 0's lines)."""
        path = self.engine.config.metrics.path or self.engine.runtime.env.metrics_path
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(record) + "\n").encode())
            finally:
                os.close(fd)

    def _fire(self, f: Fault, step: int) -> None:
        if f.kind == "kill":
            _die()
        elif f.kind == "hang":
            while True:  # never reach the next collective; the peers time out and the group restarts
                time.sleep(3600)
        elif f.kind == "node-loss":
            self._lose_node()
        elif f.kind == "corrupt":
            self._corrupt(step)
            _die()

    def _lose_node(self) -> None:
        """This node's snapshot process and shared memory go with its ranks."""
        from dtrain.snapshot.client import node_dir, stop_daemon

        directory = node_dir(self.run, self.node)
        stop_daemon(directory, signal.SIGKILL)
        for p in directory.glob("r*.slot*"):
            p.unlink(missing_ok=True)
        _die()

    def _corrupt(self, step: int) -> None:
        plugin = next((p for p in self.engine.plugins if p.name == "snapshot"), None)
        if plugin is None or not plugin.wait_committed(step):
            raise FaultSpecError(f"corrupt: the snapshot of step {step} never committed")
        info = plugin.client.call("fetch", rank=self.rank, step=step)
        with open(info["path"], "r+b") as f:  # flip bytes in the tensor data, past the header
            f.seek(info["nbytes"] // 2)
            data = bytearray(f.read(64))
            f.seek(info["nbytes"] // 2)
            f.write(bytes(b ^ 0xFF for b in data))


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
