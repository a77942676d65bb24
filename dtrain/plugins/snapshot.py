"""The ``snapshot`` resilience plugin: every ``snapshot.every`` steps, hand this rank's state to its
node's snapshot process; after a restart, restore the newest snapshot every rank can have back.

What a rank hands over is exactly what a disk checkpoint holds for it (its shard of parameters
and optimizer state, torch/CUDA/python/numpy RNG states, plugin state such as CO2's outer
state) plus the shared metadata (step = data position, LR scheduler, optimizer hyperparameters),
as one blob (:mod:`dtrain.snapshot.blob`). At ``after_step`` training blocks only to copy what
the next forward and backward may change (RNG states, plugin state, buffers:
:func:`dtrain.checkpoint.capture_volatile`); a background thread of the rank then captures the
rest, lays the blob out, copies it into a shared-memory slot and hands it to the snapshot
process while the next step's forward and backward run. Parameters, optimizer state and the LR
schedule change only in the next optimizer step, and the engine's ``before_update`` hook makes
that step wait for the thread (normally long finished). Checksums, erasure
coding across nodes and the commit happen in the snapshot process (:mod:`dtrain.snapshot.daemon`).
A rank killed while its copy is in flight loses that snapshot, and restores the one before.

Restore order at start-up: the newest step held in memory (rebuilding lost nodes from parity,
and any shard whose checksum fails), else the newest complete step of the disk tier
(``snapshot.persist_dir``: the newest step every rank listed complete, since a surviving node's
snapshot process may finish writing one while the ranks look), else nothing (the engine then
tries ``checkpoint.dir``). Unless the step came from memory, the surviving snapshot processes drop
what they held (steps newer than the one restored, which the run would otherwise snapshot a
second time and hang on). A snapshot written by another run, world size or configuration is
refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from dtrain.checkpoint import CheckpointError, Volatile, capture, capture_volatile, load
from dtrain.plugins.base import Plugin, register
from dtrain.plugins.snapshot_config import SnapshotConfig
from dtrain.snapshot import blob as blobs
from dtrain.snapshot.client import DaemonClient, node_dir, run_dir
from dtrain.snapshot.coding import GroupLayout
from dtrain.snapshot.daemon import SLOTS
from dtrain.snapshot.recovery import agreed_steps, choose_in_memory, persisted_steps
from dtrain.snapshot.secret import SECRET_VAR, SecretError, job_secret, key_check
from dtrain.snapshot.slots import SlotMaps

_FINGERPRINT_IGNORES = {"snapshot", "metrics", "checkpoint"}


class SnapshotError(RuntimeError):
    """Snapshots cannot run (no shared memory, no snapshot process) or cannot be restored."""


@register
class SnapshotPlugin(Plugin):
    name: ClassVar[str] = "snapshot"
    slot: ClassVar[str] = "resilience"
    Config = SnapshotConfig  # the ``snapshot`` section; defined in a torch-free module for the launcher

    def setup(self, engine: Any) -> None:
        super().setup(engine)
        self.cfg = engine.config.snapshot
        self.comm = engine.comm
        shape = self.comm.topology.shape
        self.node, self.nodes = shape.node_rank, shape.nodes
        self.local_ranks = self.comm.group_ranks("node")
        self.is_node_leader = self.comm.rank == self.local_ranks[0]
        m = min(self.cfg.ec_parity, self.nodes - 1)
        k = self.cfg.ec_data or self.nodes - m
        try:
            self.groups = GroupLayout.for_job(self.nodes, k, m)
        except ValueError as exc:
            raise SnapshotError(f"snapshot.ec_data/ec_parity: {exc}; pick k + m dividing the node count "
                                f"(or leave snapshot.ec_data = 0)") from None
        self.k, self.m = k, m
        self.block_s = 0.0
        self.blob_bytes = 0
        self.last_step = -1  # newest step handed to the snapshot process (or restored)
        self.captured_step = -1  # newest step captured (its write may still be in flight)
        self.client: DaemonClient | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="dtrain-snapshot")
        self._pending: Future[None] | None = None
        self._next_slot: str | None = None  # reserved by the snapshot process's reply to `written`
        self.write_cpu_s = 0.0  # CPU time of the newest background write
        self._waited = 0.0
        self._slots = SlotMaps(writable=True)
        self._persist_seen = {"failed": 0, "skipped": 0}  # the disk tier's counts already reported
        self._persist_events: list[dict[str, Any]] = []  # to write from the training thread

    # ------------------------------------------------------------------ start-up
    def _start(self) -> None:
        """Start or find the node's snapshot process and introduce the job's daemons to each other."""
        engine, comm = self.engine, self.comm
        self.fingerprint = _fingerprint(engine)
        self.dir = node_dir(run_dir(self.cfg.run_id), self.node)
        self.client = DaemonClient(self.dir)
        host = self.cfg.host or _gloo_address()
        error, key, check = "", b"", None
        if self.is_node_leader:
            try:
                self._check_capacity()
                # the job secret comes from the launcher (or the node): it never crosses a collective
                key = job_secret(self.dir.parent)
                check = key_check(key, self.dir.parent.name)
                self.client.ensure_started(self.node, self.nodes, self.k, self.m, host, self.cfg.persist_dir,
                                           self.cfg.persist_every, self.cfg.idle_s)
            except (SnapshotError, SecretError, RuntimeError, OSError) as exc:
                error = f"node {self.node}: {exc}"
        _raise_any(comm.all_gather_json(error))
        checks = {c for c in comm.all_gather_json(check) if c is not None}
        if len(checks) > 1:
            raise SnapshotError(f"the nodes hold different job secrets (each made its own: no {SECRET_VAR}); "
                                f"set {SECRET_VAR} to the same random value on every node, or start the job "
                                f"with `dtrain launch`")
        reply: dict[str, Any] = {}
        if self.is_node_leader:
            try:
                reply = self.client.call("configure", epoch=engine.runtime.env.restart_count, job_key=key.hex(),
                                         local_ranks=self.local_ranks, fingerprint=self.fingerprint)
            except Exception as exc:
                error = f"node {self.node}: {exc}"
        infos = comm.all_gather_json({"error": error, "node": self.node, "host": host, "port": reply.get("port")})
        _raise_any([i["error"] for i in infos], mismatch=True)
        peers = {i["node"]: [i["host"], i["port"]] for i in infos if i["port"] is not None}
        if self.is_node_leader:
            self.client.call("peers", peers={str(n): a for n, a in peers.items()})
        comm.barrier()

    def _check_capacity(self) -> None:
        """Refuse before training when /dev/shm cannot hold the snapshot slots plus parity."""
        state = capture(self.engine, all_units=True, with_extra=True)
        mine = blobs.plan(state, 0, self.comm.rank, self.fingerprint).nbytes
        node_bytes = mine * len(self.local_ranks)
        need = int(node_bytes * (SLOTS + 2 * self.m / self.k))
        shm = self.dir
        free = shutil.disk_usage(shm).free + sum(p.stat().st_size for p in shm.glob("r*.slot*"))
        if need > free:
            raise SnapshotError(
                f"shared memory too small for snapshots: node {self.node} needs {need / 2**30:.2f} GiB "
                f"({SLOTS} slots x {len(self.local_ranks)} ranks x {mine / 2**20:.1f} MiB, parity of two steps "
                f"x{self.m}/{self.k}) "
                f"but {shm.parent.parent} has {free / 2**30:.2f} GiB free; enlarge it "
                f"(mount -o remount,size=... /dev/shm) or snapshot fewer ranks per node")

    def restore(self) -> str | None:
        self._start()
        memory = self._restore_memory()
        how = memory or self._restore_disk()
        if memory is None and self.is_node_leader:
            # a surviving node's snapshot process still holds the steps it had before the failure,
            # newer than a step restored from disk: the run would snapshot those steps again
            self.client.call("keep", step=None)
        self.comm.barrier()
        return how

    def _restore_memory(self) -> str | None:
        comm = self.comm
        status = self.client.call("status", _wait=90.0, timeout_s=60.0) if self.is_node_leader else None
        statuses = [s for s in comm.all_gather_json(status) if s is not None]
        by_node: list[dict[str, Any] | None] = [None] * self.nodes
        for s in statuses:
            by_node[s["node"]] = s
        step, rebuild = choose_in_memory(by_node, self.groups)
        if step is None:
            return None
        for attempt in range(2):
            if self.node in rebuild and self.is_node_leader:
                error = ""
                try:
                    self.client.call("rebuild", _wait=300.0, step=step)
                except Exception as exc:
                    error = f"node {self.node}: rebuilding step {step} failed: {exc}"
                _raise_any(comm.all_gather_json(error))
            elif rebuild:
                _raise_any(comm.all_gather_json(""))
            if self.is_node_leader:
                self.client.call("keep", step=step)
            comm.barrier()
            reader, problem = self._read_own(step)
            bad = comm.all_gather_json(self.node if problem else None)
            bad_nodes = sorted({n for n in bad if n is not None})
            if not bad_nodes:
                self._load(reader)
                how = "local snapshot" if not rebuild else f"parity rebuild of node(s) {rebuild}"
                return f"in-memory snapshot of step {step} ({how})"
            if comm.rank == 0:
                print(f"dtrain: snapshot of step {step} on node(s) {bad_nodes} failed its checksum; "
                      f"rebuilding from parity", file=sys.stderr)
            if problem:
                print(f"dtrain: rank {comm.rank}: {problem}", file=sys.stderr)
            if self.k + self.m == 1 or attempt:
                return None
            rebuild = bad_nodes
        return None

    def _read_own(self, step: int) -> tuple[blobs.BlobReader | None, str]:
        try:
            info = self.client.call("fetch", rank=self.comm.rank, step=step)
        except Exception as exc:
            return None, f"no snapshot of step {step}: {exc}"
        with open(info["path"], "rb") as f:
            data = bytearray(f.read(info["nbytes"]))
        if blobs.checksum(data) != info["crc"]:
            return None, f"snapshot shard of step {step} ({info['path']}) fails its CRC-32 checksum"
        try:
            return blobs.BlobReader(data, f"in-memory snapshot of step {step}"), ""
        except CheckpointError as exc:
            return None, str(exc)

    def _restore_disk(self) -> str | None:
        if not self.cfg.persist_dir:
            return None
        listed = persisted_steps(self.cfg.persist_dir, self.nodes)
        common = agreed_steps(self.comm.all_gather_json([step for step, _ in listed]))
        for step, index in listed:
            if step not in common:
                continue
            other = {n: i["fingerprint"] for n, i in index.items() if i["fingerprint"] != self.fingerprint}
            if other:
                raise blobs.SnapshotMismatch(
                    f"snapshot.persist_dir {self.cfg.persist_dir} holds step {step} of a different run "
                    f"(another model, world size or configuration); use an empty directory for this run "
                    f"or restore the original settings")
            problem = ""
            reader = None
            try:
                table = {r: (nb, crc) for r, nb, crc in index[self.node]["table"]}
                nbytes, crc = table[self.comm.rank]
                data = bytearray((Path(self.cfg.persist_dir) / f"step-{step:09d}" / f"rank{self.comm.rank}.bin")
                                 .read_bytes())
                if len(data) != nbytes or blobs.checksum(data) != crc:
                    problem = "checksum mismatch"
                else:
                    reader = blobs.BlobReader(data, f"persisted snapshot of step {step}")
            except (OSError, KeyError, CheckpointError) as exc:
                problem = str(exc)
            if any(self.comm.all_gather_json(problem)):
                continue
            self._load(reader)
            return f"disk tier {self.cfg.persist_dir} (step {step})"
        return None

    def _load(self, reader: blobs.BlobReader) -> None:
        if reader.fingerprint != self.fingerprint:
            raise blobs.SnapshotMismatch(f"{reader.where_saved} was written by a different run (another model, "
                                         f"world size or configuration); it is refused")
        load(self.engine, reader)
        self.last_step = reader.step

    # ------------------------------------------------------------------ every step
    def after_step(self, step: int) -> None:
        start = time.perf_counter()
        self._report_persist()
        if step % self.cfg.every == 0:
            self.flush()
            volatile = capture_volatile(self.engine, with_extra=True)
            self._pending = self._writer.submit(self._write, volatile, step)
            self.captured_step = step
        # what this step waited for snapshots: the capture now plus any wait before its update
        self.block_s, self._waited = self._waited + time.perf_counter() - start, 0.0

    def before_update(self) -> None:
        start = time.perf_counter()
        self.flush()
        self._waited += time.perf_counter() - start

    def flush(self) -> None:
        """Wait until the snapshot in flight is in shared memory and handed over; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, volatile: Volatile, step: int) -> None:
        """Background thread, before the next optimizer step: capture the rest of the state, lay
        it out, copy it into a free slot, tell the snapshot process (whose reply names the slot
        for the next snapshot when one is free already; else ask for one, waiting for a commit)."""
        cpu = time.thread_time()
        state = capture(self.engine, all_units=True, with_extra=True, volatile=volatile)
        part = self.engine.layout.placement("master")[2]
        plan = blobs.plan(state, step, self.comm.rank, self.fingerprint, part)
        path, self._next_slot = self._next_slot, None
        slot = self._slots.view(path, plan.nbytes) if path is not None else None
        if slot is None:  # none reserved, or too small for this blob: the snapshot process grows it
            path = self.client.call("reserve", rank=self.comm.rank, nbytes=plan.nbytes,
                                    timeout_s=self.cfg.timeout_s, _wait=self.cfg.timeout_s + 30)["path"]
            slot = self._slots.view(path, plan.nbytes)
            if slot is None:
                raise SnapshotError(f"slot {path} reserved for {plan.nbytes} bytes is smaller")
        with slot:
            blobs.write(slot, state, plan)
        reply = self.client.call("written", rank=self.comm.rank, step=step, path=path, nbytes=plan.nbytes)
        self._next_slot = reply.get("next")
        self._note_persist(reply.get("persist"))
        self.blob_bytes = plan.nbytes
        self.last_step = step
        self.write_cpu_s = time.thread_time() - cpu

    def metrics(self) -> dict[str, float]:
        return {"snapshot_block_s": self.block_s, "snapshot_write_cpu_s": self.write_cpu_s,
                "snapshot_step": self.captured_step,
                "snapshot_bytes": self.blob_bytes, "snapshot_memory_overhead": (self.k + self.m) / self.k}

    def wait_committed(self, step: int, timeout_s: float = 60.0) -> bool:
        self.flush()
        reply = self.client.call("wait_commit", _wait=timeout_s + 10, step=step, timeout_s=timeout_s)
        self._note_persist(reply.get("persist"))
        return bool(reply["committed"])

    # ------------------------------------------------------------------ disk tier reports
    def _note_persist(self, report: dict[str, Any] | None) -> None:
        """Turn the node's disk-tier counts (a snapshot process reply) into events, once per node
        (its leader's); any thread."""
        if not report or not self.is_node_leader or not self.cfg.persist_every:
            return
        if report["failed"] > self._persist_seen["failed"]:
            self._persist_events.append({"event": "snapshot_persist_error", "node": self.node,
                                         "step": report["error_step"], "failed": report["failed"],
                                         "error": report["error"]})
        if report["skipped"] > self._persist_seen["skipped"]:
            self._persist_events.append({"event": "snapshot_persist_skipped", "node": self.node,
                                         "skipped": report["skipped"]})
        self._persist_seen = {"failed": report["failed"], "skipped": report["skipped"]}

    def _report_persist(self) -> None:
        """Write the noted events to the metrics stream (appended, as any rank may be a node's
        leader) and each error as one line on stderr."""
        path = self.engine.config.metrics.path or self.engine.runtime.env.metrics_path
        while self._persist_events:
            event = {**self._persist_events.pop(0), "time": time.time()}
            if event["event"] == "snapshot_persist_error":
                print(f"dtrain: snapshot disk tier: {event['error']} (failure {event['failed']} of this run)",
                      file=sys.stderr, flush=True)
            if path:
                with open(path, "a") as f:
                    f.write(json.dumps(event) + "\n")

    def teardown(self) -> None:
        """The run finished: the node's snapshot process is no longer needed."""
        if self.client is None:
            return
        try:
            self.flush()
        finally:
            self._writer.shutdown(wait=True)
            self._slots.close()
        if self.last_step > 0:  # the final state reaches memory (and the disk tier) before we stop
            self.wait_committed(self.last_step)
        self.comm.barrier()
        final: dict[str, Any] = {}
        if self.is_node_leader:
            try:
                final = self.client.call("shutdown", _wait=60.0).get("persist") or {}
            except Exception:
                pass
        self.client.close()
        self._note_persist(final)
        self._report_persist()
        if self.is_node_leader and self.cfg.persist_every and final.get("error_step", -1) > final.get("newest", -1):
            raise SnapshotError(f"the snapshot disk tier does not hold this run's final state: {final['error']}")


def _fingerprint(engine: Any) -> str:
    """What must match for a snapshot to restore bit-exactly into this run."""
    config = {k: v for k, v in engine.config.to_dict().items() if k not in _FINGERPRINT_IGNORES}
    config.get("comm", {}).pop("timeout_s", None)
    units = [[s.name, list(s.shape)] for u in engine.layout.unit_specs() for s in u.slots]
    blob = json.dumps({"world": engine.comm.topology.shape.world_size, "layout": engine.layout.name,
                       "units": units, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _gloo_address() -> str:
    """The address gloo uses on this node (its GLOO_SOCKET_IFNAME interface), else loopback."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if ifname:
        import socket

        import psutil

        for addr in psutil.net_if_addrs().get(ifname.split(",")[0], []):
            if addr.family == socket.AF_INET:
                return addr.address
    return "127.0.0.1"


def _raise_any(errors: list[Any], mismatch: bool = False) -> None:
    problems = [e for e in errors if e]
    if problems:
        cls = blobs.SnapshotMismatch if mismatch and any("another run" in p for p in problems) else SnapshotError
        raise cls("; ".join(problems))
