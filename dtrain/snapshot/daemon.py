"""The snapshot process of one node: owns the shared memory that holds snapshots, codes them.

One daemon runs per node, as its own OS process in its own session, so it outlives the training
processes (a crashed rank restarts and finds its snapshot here). Ranks talk to it over a Unix
socket in the node's run directory (``multiprocessing.connection``'s HMAC handshake with the node's
key); daemons of different nodes over TCP, as :class:`dtrain.snapshot.wire.Channel`: a handshake
under the job secret, then an HMAC-SHA256 tag on every message, bound to the run, the attempt
(``epoch``), the step, the sending node and the stripe (SECURITY.md). The TCP listener accepts only
the job's peer addresses (from ``peers``), runs each handshake in a thread of its own with a
timeout, and every send to a peer and every connect has a timeout too.

Per snapshot step ``s`` (see :mod:`dtrain.snapshot.coding` for the stripe layout):

1. each local rank copies its blob into a slot (a file in the node's /dev/shm directory, mode
   0600, :data:`SLOTS` per rank: the last committed snapshot survives while the previous step is
   still being coded and the next is written) and says ``written``; the reply reserves the slot
   for its next snapshot when one is free already (else the rank asks with ``reserve``, which
   waits for a commit), so a snapshot normally costs a rank one request. A rank does this in a
   background thread (:mod:`dtrain.plugins.snapshot`);
2. the daemon's worker thread checksums the node's blobs (CRC-32C) and sends each data chunk to
   the parity holders of its stripe; a parity holder encodes once it has all ``k`` chunks;
3. a node whose blobs are checksummed, chunks sent and parity blocks encoded is *complete* for
   ``s`` and tells every daemon; ``s`` is *committed* when every node of the job is complete
   (so every parity holder has coded what it was sent: chunks and these notices are one-way
   messages, and a parity holder is complete only once it has).
   Older steps are dropped then, and every ``persist_every``-th committed step is written to
   disk by a background thread (temporary file, fsync, atomic rename, checksums in a JSON index).
   At most one step waits for the disk while another is written: a newer committed step replaces
   a waiting one (counted as skipped), so the disk tier always gets the newest step and a slow
   disk never holds more than two copies. Failed and skipped persists are counted and reach the
   ranks in the replies to ``written``, ``wait_commit`` and ``shutdown`` (``persist``).

The daemon keeps its mappings of the slot files and its receive buffers from step to step, and
runs under ``SCHED_IDLE`` (:func:`lower_priority`): on a node whose cores training keeps busy,
coding takes the moments a core would otherwise idle, and training blocks on it only through
:data:`SLOTS` (a rank whose every slot is still in use waits for a commit).

Recovery asks every daemon what it holds (``status``), rebuilds lost nodes' data from the others'
chunks and parity (``rebuild``), and pins the chosen step (``keep``). The ranks make that decision
(:mod:`dtrain.snapshot.client`); the daemon only answers.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from dtrain.snapshot import wire
from dtrain.snapshot.coding import GroupLayout, checksum, chunk_bounds, decode_chunk, encode_parity
from dtrain.snapshot.slots import SlotMaps

Table = list[list[int]]  # [[rank, nbytes, crc], ...] in local-rank order
SLOTS = 3  # per rank: the newest committed step, one still being coded, the one being written
SLOT_SLACK = 64 << 10  # bytes a slot grows beyond the blob that needed it
NICE = 19  # where SCHED_IDLE is unavailable
POOL_KEEP = 8  # spare receive buffers kept for the next steps
HANDSHAKE_S = 10.0  # an accepted peer connection must prove the job secret within this
PEER_TIMEOUT_S = 30.0  # connecting to a peer, and any read or write on it that makes no progress
MAX_HANDSHAKES = 32  # accepted connections still in their handshake; more are closed at once


@dataclass
class Parity:
    block: bytes
    lengths: dict[int, int]  # data node -> true chunk length
    tables: dict[int, Table]  # data node -> its node table


@dataclass
class StepState:
    step: int
    blobs: dict[int, tuple[str, int]] = field(default_factory=dict)  # rank -> (slot path, nbytes)
    table: Table | None = None  # set once every local blob is checksummed
    sent: bool = False
    inbox: dict[int, dict[int, tuple[bytes, Table]]] = field(default_factory=dict)  # stripe -> node -> chunk
    parity: dict[int, Parity] = field(default_factory=dict)
    complete: set[int] = field(default_factory=set)
    committed: bool = False


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.dir = Path(args.dir)
        self.node, self.nodes = args.node, args.nodes
        self.group = next(g for g in GroupLayout.for_job(args.nodes, args.k, args.m) if args.node in g.nodes)
        self.host = args.host
        self.persist_dir = Path(args.persist_dir) if args.persist_dir else None
        self.persist_every = args.persist_every
        self.idle_s = args.idle_s
        self.cv = threading.Condition()
        self.steps: dict[int, StepState] = {}
        self.local_ranks: list[int] = []
        self.epoch = -1
        self.job_key = b""
        self.peers: dict[int, tuple[str, int]] = {}
        self.peer_ips: set[str] = set()  # addresses a peer connection may come from
        self.peer_conns: dict[int, Connection] = {}
        self.peer_locks: dict[int, threading.Lock] = {}
        self.fingerprint = ""
        self.run = self.dir.parent.name  # the job's run key: every peer message names it
        self.tcp: socket.socket | None = None
        self.handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self.refused: set[str] = set()  # addresses already logged as refused
        self.work: "queue.Queue[tuple[str, int]]" = queue.Queue()
        self.persist_q: "queue.Queue[tuple[int, list[tuple[int, bytes]], Table]]" = queue.Queue(maxsize=1)
        self.persist_lock = threading.Lock()  # one committing thread at a time replaces the waiting step
        self.persist_report: dict[str, Any] = {"failed": 0, "skipped": 0, "error": "", "error_step": -1, "newest": -1}
        self.busy = 0  # queued worker tasks not yet done
        self.clients = 0
        self.last_client = time.monotonic()
        self.persisted: list[int] = []
        self.maps = SlotMaps()
        self.buffers = _BufferPool()
        self.stop = threading.Event()

    # ------------------------------------------------------------------ plumbing
    def log(self, msg: str) -> None:
        print(f"[snapshot node {self.node}] {msg}", file=sys.stderr, flush=True)

    def serve(self, key: bytes) -> None:
        sock = str(self.dir / "sock")
        if os.path.exists(sock):
            os.unlink(sock)
        listener = Listener(sock, family="AF_UNIX", authkey=key)
        os.chmod(sock, 0o600)
        for target in (self._worker, self._persister, self._idle_watch):
            threading.Thread(target=target, daemon=True).start()
        threading.Thread(target=self._accept, args=(listener, self._rank_conn), daemon=True).start()
        (self.dir / "daemon.json.tmp").write_text(json.dumps({"pid": os.getpid(), "socket": sock}))
        os.replace(self.dir / "daemon.json.tmp", self.dir / "daemon.json")
        self.log(f"serving {sock} (pid {os.getpid()})")
        self.stop.wait()
        self.cleanup()

    def cleanup(self) -> None:
        self.maps.close()
        for p in self.dir.glob("r*.slot*"):
            p.unlink(missing_ok=True)
        for name in ("sock", "daemon.json"):
            (self.dir / name).unlink(missing_ok=True)

    def _accept(self, listener: Listener, handler) -> None:
        while not self.stop.is_set():
            try:
                conn = listener.accept()
            except Exception:  # a bad key
                continue
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    def _accept_peers(self, listener: socket.socket) -> None:
        """Accept TCP connections of the job's peers only; each handshake runs in its own thread,
        so a silent or slow connection holds up nobody else."""
        while not self.stop.is_set():
            try:
                sock, (ip, port) = listener.accept()[:2]
            except OSError:  # this listener was replaced and closed
                if listener is not self.tcp:
                    return
                continue
            with self.cv:
                allowed = ip in self.peer_ips
            if not allowed or not self.handshakes.acquire(blocking=False):
                why = "not a peer of this job" if not allowed else f"{MAX_HANDSHAKES} handshakes pending"
                self._log_refused(ip, f"refused a connection from {ip}:{port} ({why})")
                sock.close()
                continue
            threading.Thread(target=self._handshake, args=(sock, f"peer at {ip}:{port}"), daemon=True).start()

    def _handshake(self, sock: socket.socket, peer: str) -> None:
        try:
            with self.cv:
                key = self.job_key
            conn = wire.accept_peer(sock, key, peer, HANDSHAKE_S, PEER_TIMEOUT_S)
        except wire.HandshakeError as exc:
            self._log_refused(peer.rsplit(":", 1)[0], f"refused: {exc}")
            return
        finally:
            self.handshakes.release()
        self._peer_conn(conn)

    def _log_refused(self, who: str, msg: str) -> None:
        with self.cv:
            first = who not in self.refused
            self.refused.add(who)
        if first:  # once per address: a scanner must not flood the log
            self.log(msg)

    def _serve_conn(self, conn: Connection, dispatch, into=None) -> None:
        try:
            while True:
                try:
                    header, payload = wire.recv(conn, into)
                except wire.TagError as exc:  # nothing of it is used; the connection is not trusted
                    self.log(f"{exc}; closing the connection")
                    return
                try:
                    reply, data = dispatch(header, payload)
                except Exception as exc:  # answer with the error; the connection stays usable
                    reply, data = {"error": f"{type(exc).__name__}: {exc}"}, None
                    if not isinstance(exc, (ValueError, TimeoutError, KeyError)):
                        self.log(traceback.format_exc())
                    elif header.get("_oneway"):  # nobody waits for this answer
                        self.log(f"{header.get('op')} from node {header.get('from')}: {reply['error']}")
                if not header.get("_oneway"):
                    wire.send(conn, reply, data)
                if header.get("op") == "shutdown":
                    self.stop.set()
        except (EOFError, OSError):
            pass
        finally:
            conn.close()

    def _rank_conn(self, conn: Connection) -> None:
        with self.cv:
            self.clients += 1
        try:
            self._serve_conn(conn, self._rank_op)
        finally:
            with self.cv:
                self.clients -= 1
                self.last_client = time.monotonic()

    def _idle_watch(self) -> None:
        while not self.stop.wait(1.0):
            with self.cv:
                idle = self.clients == 0 and time.monotonic() - self.last_client > self.idle_s
            if idle:
                self.log(f"no rank connected for {self.idle_s:g} s; exiting")
                self.stop.set()

    def _peer(self, node: int, header: dict[str, Any], payload: wire.Payload | None = None,
              timeout_s: float = 60.0, oneway: bool = False) -> tuple[dict[str, Any], Any]:
        """Request ``header`` of node ``node``'s daemon; ``oneway``: send only (no reply comes)."""
        with self.cv:
            lock = self.peer_locks.setdefault(node, threading.Lock())
            address, key, epoch = self.peers.get(node), self.job_key, self.epoch
        if address is None:
            raise ValueError(f"no address for node {node}'s snapshot process")
        with lock:
            conn = self.peer_conns.get(node)
            if conn is None:
                conn = self.peer_conns[node] = wire.connect_peer(
                    address, key, f"node {node}'s snapshot process at {address[0]}:{address[1]}",
                    PEER_TIMEOUT_S, source=self.host)
            try:
                header = {**header, "run": self.run, "epoch": epoch, "from": self.node}
                if oneway:
                    wire.send(conn, {**header, "_oneway": True}, payload)
                    return {}, None
                reply, data = wire.request(conn, header, payload, timeout_s)
                bound = {f: header[f] for f in ("step", "stripe") if f in header} | {"node": node}
                if "node" in reply and any(reply.get(f) != v for f, v in bound.items()):
                    raise wire.TagError(f"{header['op']!r} reply from {conn.peer} is for "
                                        f"{ {f: reply.get(f) for f in bound} }, not {bound}; refused")
                return reply, data
            except (EOFError, OSError, TimeoutError, wire.TagError):
                self.peer_conns.pop(node, None)
                conn.close()
                raise

    def _state(self, step: int) -> StepState:
        st = self.steps.get(step)
        if st is None:
            st = self.steps[step] = StepState(step)
        return st

    # ------------------------------------------------------------------ rank requests
    def _rank_op(self, h: dict[str, Any], payload: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        op = h["op"]
        if op == "configure":
            return self._configure(h), None
        if op == "peers":
            peers = {int(n): (a[0], int(a[1])) for n, a in h["peers"].items()}
            ips = {socket.gethostbyname(a[0]) for a in peers.values()}
            with self.cv:
                self.peers, self.peer_ips = peers, ips
            return {}, None
        if op == "reserve":
            return {"path": self._reserve(h["rank"], h["nbytes"], h["timeout_s"])}, None
        if op == "written":
            rank = h["rank"]
            with self.cv:
                st = self._state(h["step"])
                st.blobs[rank] = (h["path"], h["nbytes"])
                ready = len(st.blobs) == len(self.local_ranks)
                following = self._free_slot(rank)
            if ready:
                self._queue("encode", h["step"])
            if following is not None:
                self._size_slot(following, h["nbytes"])
            return {"next": following, "persist": dict(self.persist_report)}, None
        if op == "status":
            self._drain(h.get("timeout_s", 30.0))
            return self._status(), None
        if op == "fetch":
            with self.cv:
                st = self.steps.get(h["step"])
                if st is None or st.table is None or h["rank"] not in st.blobs:
                    raise KeyError(f"node {self.node} holds no complete snapshot of step {h['step']}")
                crc = {r: c for r, _, c in st.table}[h["rank"]]
                path, nbytes = st.blobs[h["rank"]]
            return {"path": path, "nbytes": nbytes, "crc": crc}, None
        if op == "rebuild":
            self._rebuild(h["step"])
            return {}, None
        if op == "keep":
            self._keep(h["step"])
            return {}, None
        if op == "wait_commit":
            return {"committed": self._wait_commit(h["step"], h["timeout_s"]),
                    "persist": dict(self.persist_report)}, None
        if op == "usage":
            with self.cv:
                data = sum(nb for st in self.steps.values() for _, nb in st.blobs.values())
                parity = sum(len(p.block) for st in self.steps.values() for p in st.parity.values())
            return {"data_bytes": data, "parity_bytes": parity, "persisted": list(self.persisted)}, None
        if op == "shutdown":  # after the disk tier has what was queued for it
            deadline = time.monotonic() + 60.0
            while self.persist_q.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.05)
            return {"persist": dict(self.persist_report)}, None
        raise ValueError(f"unknown request {op!r}")

    def _configure(self, h: dict[str, Any]) -> dict[str, Any]:
        """A new attempt of the job: its key, its ranks on this node; (re)open the TCP listener."""
        with self.cv:
            if self.fingerprint and h["fingerprint"] != self.fingerprint:
                raise ValueError(f"node {self.node}'s snapshot process holds snapshots of another run "
                                 f"(fingerprint {self.fingerprint[:12]}, this job {h['fingerprint'][:12]})")
            self.fingerprint = h["fingerprint"]
            self.local_ranks = list(h["local_ranks"])
            new_key = bytes.fromhex(h["job_key"])
            self.epoch = h["epoch"]
            for conn in self.peer_conns.values():
                conn.close()
            self.peer_conns.clear()
            if self.tcp is None or new_key != self.job_key:
                old, self.tcp = self.tcp, socket.create_server((self.host, 0), backlog=64)
                self.job_key = new_key
                if old is not None:
                    old.close()
                threading.Thread(target=self._accept_peers, args=(self.tcp,), daemon=True).start()
            return {"port": self.tcp.getsockname()[1]}

    def _reserve(self, rank: int, nbytes: int, timeout_s: float) -> str:
        """A slot file of at least ``nbytes`` for ``rank``'s next blob; waits for a commit while every
        slot holds the newest committed step or one still being coded."""
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while (path := self._free_slot(rank)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    pending = sorted(s for s, st in self.steps.items() if not st.committed)
                    missing = sorted(set(range(self.nodes)) - self.steps[pending[0]].complete) if pending else []
                    raise TimeoutError(f"snapshot of step {pending[0] if pending else '?'} did not commit within "
                                       f"{timeout_s:g} s (nodes not complete: {missing}); a peer node "
                                       f"or its snapshot process is gone")
                self.cv.wait(min(left, 1.0))
        self._size_slot(path, nbytes)
        return path

    def _free_slot(self, rank: int) -> str | None:
        """A slot of ``rank`` holding neither the newest committed step nor a newer one (call with
        ``cv`` held); None while all do. Older steps are never read again (the worker codes steps
        in order), so such a slot stays free until the rank writes into it."""
        keep_from = max((s for s, st in self.steps.items() if st.committed), default=-1)
        busy = {st.blobs[rank][0] for s, st in self.steps.items() if s >= keep_from and rank in st.blobs}
        return next((p for p in (self._slot(rank, i) for i in range(SLOTS)) if p not in busy), None)

    @staticmethod
    def _size_slot(path: str, nbytes: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Slots only grow (with room for the header's step-to-step jitter), so a rank can keep
            # its slots mapped: a mapping never reaches past the end of its file.
            if os.fstat(fd).st_size < nbytes:
                size = nbytes + SLOT_SLACK
                os.ftruncate(fd, size)
                os.posix_fallocate(fd, 0, size)  # tmpfs full fails here, not as SIGBUS later
        finally:
            os.close(fd)

    def _slot(self, rank: int, i: int) -> str:
        return str(self.dir / f"r{rank}.slot{i}")

    def _drain(self, timeout_s: float) -> None:
        """Wait until this node's queued steps are coded and every peer has handled what they sent
        it: chunks and ``complete`` notices are one-way, and a peer serves a connection in order,
        so its answer to a ``ping`` on the same connection comes after them."""
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while self.busy and time.monotonic() < deadline:
                self.cv.wait(0.2)
            peers = list(self.peer_conns)
        for n in peers:
            try:
                self._peer(n, {"op": "ping"}, timeout_s=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a lost node or another attempt's daemon: nothing to wait for
                pass

    def _status(self) -> dict[str, Any]:
        with self.cv:
            steps = {}
            for s, st in self.steps.items():
                if st.table is None and not st.parity:
                    continue
                steps[str(s)] = {"local": st.table is not None, "parity": sorted(st.parity),
                                 "committed": st.committed}
            return {"node": self.node, "fingerprint": self.fingerprint, "steps": steps}

    def _keep(self, step: int | None) -> None:
        with self.cv:
            for s in list(self.steps):
                if s != step:
                    self._drop(s)
            if step is not None and step in self.steps:
                self.steps[step].committed = True
                self.steps[step].complete = set(range(self.nodes))
            self.cv.notify_all()

    def _drop(self, step: int) -> None:
        st = self.steps.pop(step)
        for par in st.parity.values():
            self.buffers.give(par.block)
        for box in st.inbox.values():
            for chunk, _ in box.values():
                self.buffers.give(chunk)
        st.parity.clear()
        st.inbox.clear()

    def _wait_commit(self, step: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while time.monotonic() < deadline:
                st = self.steps.get(step)
                newest = max((s for s, x in self.steps.items() if x.committed), default=-1)
                if (st is not None and st.committed) or newest > step:
                    return True
                self.cv.wait(0.2)
        return False

    # ------------------------------------------------------------------ encoding
    def _queue(self, op: str, step: int) -> None:
        with self.cv:
            self.busy += 1
        self.work.put((op, step))

    def _worker(self) -> None:
        """Codes steps in order and is the only thread that sends to peers while training runs.
        A thread serving a peer connection must never block on sending to a peer: two nodes'
        senders each waiting for the other's reader to drain a full socket would deadlock."""
        while True:
            op, step = self.work.get()
            try:
                if op == "encode":
                    self._encode(step)
                elif op == "check":
                    self._check_complete(step)
            except Exception:
                self.log(f"step {step}: {traceback.format_exc()}")
            finally:
                with self.cv:
                    self.busy -= 1
                    self.cv.notify_all()

    def _encode(self, step: int) -> None:
        with self.cv:
            st = self.steps.get(step)
            if st is None:
                return
            blobs = [(r, *st.blobs[r]) for r in self.local_ranks]
        with _NodeBlob(self.maps, [(p, n) for _, p, n in blobs]) as node_blob:
            table = [[rank, nbytes, checksum(view)] for (rank, _, nbytes), view in zip(blobs, node_blob.views)]
            with self.cv:
                st.table = table
            k = self.group.k
            for c, stripe in enumerate(self.group.data_stripes(self.node)):
                a, b = chunk_bounds(node_blob.total, k, c)
                for p in self.group.parity_nodes(stripe):
                    if p == self.node:
                        self._receive_chunk(step, stripe, self.node, node_blob.read(a, b), table)
                    else:  # sent from the slots themselves, without joining the pieces
                        self._peer(p, {"op": "chunk", "step": step, "stripe": stripe, "table": table},
                                   node_blob.pieces(a, b), oneway=True)
        with self.cv:
            st.sent = True
        self._check_complete(step)

    def _receive_chunk(self, step: int, stripe: int, node: int, chunk: bytes, table: Table) -> None:
        with self.cv:
            st = self._state(step)
            box = st.inbox.setdefault(stripe, {})
            box[node] = (chunk, table)
            if len(box) < self.group.k:
                return
            del st.inbox[stripe]
        data = self.group.data_nodes(stripe)
        index = self.group.parity_nodes(stripe).index(self.node)
        chunks = [box[n][0] for n in data]
        block = encode_parity(chunks, self.group.k, self.group.m, index, self.buffers.take)
        if block is not chunks[0]:  # k > 1: the chunks are coded, their buffers free
            for chunk in chunks:
                self.buffers.give(chunk)
        with self.cv:
            st.parity[stripe] = Parity(block, {n: len(box[n][0]) for n in data}, {n: box[n][1] for n in data})
        self._queue("check", step)  # the worker tells the peers (see _worker)

    def _check_complete(self, step: int) -> None:
        with self.cv:
            st = self.steps.get(step)
            if st is None or st.table is None or not st.sent or self.node in st.complete:
                return
            if any(j not in st.parity for j in self.group.parity_stripes(self.node)):
                return
            st.complete.add(self.node)
            peers = [n for n in self.peers if n != self.node]
        for n in peers:
            try:
                self._peer(n, {"op": "complete", "step": step}, oneway=True)
            except Exception as exc:  # a lost node: the step cannot commit; recovery sorts it out
                self.log(f"step {step}: could not tell node {n} ({exc})")
        self._maybe_commit(step)

    def _maybe_commit(self, step: int) -> None:
        with self.cv:
            st = self.steps.get(step)
            if st is None or st.committed or len(st.complete) < self.nodes or st.table is None:
                return
            st.committed = True
            for s in [s for s in self.steps if s < step]:
                self._drop(s)
            persist = self.persist_dir is not None and self.persist_every and step % self.persist_every == 0
            copies = []
            if persist:  # copy now: the slots are reused once the next step commits
                for rank, nbytes, _ in st.table:
                    with open(st.blobs[rank][0], "rb") as f:
                        copies.append((rank, f.read(nbytes)))
            table = st.table
            self.cv.notify_all()
        if persist:
            with self.persist_lock:
                try:
                    self.persist_q.put_nowait((step, copies, table))
                except queue.Full:  # the waiting step is older: this one takes its place
                    try:
                        older = self.persist_q.get_nowait()[0]
                        self.persist_q.task_done()
                        self.persist_report["skipped"] += 1
                        self.log(f"disk tier busy: step {older} not persisted, step {step} replaces it")
                    except queue.Empty:  # the disk thread took it meanwhile
                        pass
                    self.persist_q.put_nowait((step, copies, table))

    # ------------------------------------------------------------------ peer requests
    def _peer_conn(self, conn: Connection) -> None:
        self._serve_conn(conn, self._peer_op, self._chunk_buffer)

    def _chunk_buffer(self, header: dict[str, Any], nbytes: int) -> memoryview | None:
        return self.buffers.take(nbytes) if header.get("op") == "chunk" else None

    def _peer_op(self, h: dict[str, Any], payload: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        op = h["op"]
        if h.get("run") != self.run:
            raise ValueError(f"message from node {h.get('from')} of run {h.get('run')!r}, not {self.run!r}")
        if h.get("epoch") != self.epoch:
            raise ValueError(f"message from attempt {h.get('epoch')} while this is attempt {self.epoch}")
        if op == "ping":
            return {}, None
        if op == "chunk":
            stripe, sender = h["stripe"], h["from"]
            if sender not in self.group.data_nodes(stripe) or self.node not in self.group.parity_nodes(stripe):
                raise ValueError(f"node {sender} sent a chunk of stripe {stripe}, which it does not feed here")
            self._receive_chunk(h["step"], stripe, sender, payload or b"", h["table"])
            return {}, None
        if op == "complete":
            with self.cv:
                self._state(h["step"]).complete.add(h["from"])
            self._maybe_commit(h["step"])
            return {}, None
        if op == "get_chunk":
            return self._get_chunk(h["step"], h["stripe"])
        if op == "get_parity":
            with self.cv:
                st = self.steps.get(h["step"])
                par = st.parity.get(h["stripe"]) if st else None
                block = bytes(par.block) if par is not None else None  # its buffer is reused once dropped
            if par is None:
                raise KeyError(f"node {self.node} holds no parity of step {h['step']} stripe {h['stripe']}")
            return {"lengths": {str(n): v for n, v in par.lengths.items()},
                    "tables": {str(n): t for n, t in par.tables.items()}, **self._bound(h)}, block
        raise ValueError(f"unknown peer request {op!r}")

    def _bound(self, h: dict[str, Any]) -> dict[str, Any]:
        """What a reply carrying data is of (checked by the requester, under the message's tag)."""
        return {"node": self.node, "step": h["step"], "stripe": h["stripe"]}

    def _get_chunk(self, step: int, stripe: int) -> tuple[dict[str, Any], bytes]:
        with self.cv:
            st = self.steps.get(step)
            if st is None or st.table is None:
                raise KeyError(f"node {self.node} holds no data of step {step}")
            table = st.table
            files = [(st.blobs[r][0], n) for r, n, _ in table]
        c = self.group.data_stripes(self.node).index(stripe)
        with _NodeBlob(self.maps, files) as blob:
            a, b = chunk_bounds(blob.total, self.group.k, c)
            return {"table": table, "node": self.node, "step": step, "stripe": stripe}, blob.read(a, b)

    # ------------------------------------------------------------------ rebuild
    def _rebuild(self, step: int) -> None:
        """Rebuild this node's blobs (and its parity blocks) of ``step`` from the other nodes."""
        g, me = self.group, self.node
        chunks: list[bytes] = []
        table: Table | None = None
        for stripe in g.data_stripes(me):
            data, parity = g.data_nodes(stripe), g.parity_nodes(stripe)
            blocks: dict[int, bytes] = {}
            length = None
            for i, n in enumerate(data + parity):
                if n == me or len(blocks) >= g.k:
                    continue
                try:
                    if i < len(data):
                        _, blocks[i] = self._peer(n, {"op": "get_chunk", "step": step, "stripe": stripe})
                    else:
                        h, blocks[i] = self._peer(n, {"op": "get_parity", "step": step, "stripe": stripe})
                        length = h["lengths"][str(me)]
                        table = h["tables"][str(me)]
                except Exception as exc:
                    self.log(f"rebuild step {step}: node {n} cannot help ({exc})")
            if length is None:
                raise ValueError(f"cannot rebuild node {me} step {step}: no parity holder of stripe "
                                 f"{stripe} survives")
            chunks.append(decode_chunk(blocks, g.k, g.m, data.index(me), length))
        if table is None:
            raise ValueError(f"cannot rebuild node {me} step {step}: no parity survives")
        node_bytes = b"".join(chunks)
        entries: dict[int, tuple[str, int]] = {}
        offset = 0
        for rank, nbytes, crc in table:
            path = self._reserve(rank, nbytes, 5.0)
            piece = node_bytes[offset:offset + nbytes]
            offset += nbytes
            if checksum(piece) != crc:
                raise ValueError(f"rebuilt blob of rank {rank} step {step} fails its checksum")
            with open(path, "r+b") as f:
                f.write(piece)
            entries[rank] = (path, nbytes)
        with self.cv:
            st = self._state(step)
            st.blobs, st.table, st.sent = entries, table, True
            st.complete.add(me)
        for stripe in g.parity_stripes(me):  # our own parity blocks of that step, for the next fault
            try:
                for n in g.data_nodes(stripe):
                    h, chunk = self._peer(n, {"op": "get_chunk", "step": step, "stripe": stripe})
                    self._receive_chunk(step, stripe, n, chunk or b"", h["table"])
            except Exception as exc:
                self.log(f"rebuild step {step}: parity of stripe {stripe} not rebuilt ({exc})")
        self.log(f"rebuilt step {step} ({len(node_bytes)} bytes) from parity")

    # ------------------------------------------------------------------ disk tier
    def _persister(self) -> None:
        while True:
            step, copies, table = self.persist_q.get()
            try:
                self._persist(step, copies, table)
            except Exception as exc:
                self.persist_report.update(error=f"node {self.node}: persisting step {step} to {self.persist_dir} "
                                           f"failed: {exc}", error_step=step, failed=self.persist_report["failed"] + 1)
                self.log(f"persisting step {step} failed: {traceback.format_exc()}")
                for tmp in (self.persist_dir or Path(".")).glob(f"step-{step:09d}/*.tmp"):
                    tmp.unlink(missing_ok=True)
            finally:
                self.persist_q.task_done()

    def _persist(self, step: int, copies: list[tuple[int, bytes]], table: Table) -> None:
        assert self.persist_dir is not None
        target = self.persist_dir / f"step-{step:09d}"
        target.mkdir(parents=True, exist_ok=True)
        for rank, data in copies:
            _atomic_write(target / f"rank{rank}.bin", data)
        index = {"step": step, "node": self.node, "table": table, "fingerprint": self.fingerprint}
        _atomic_write(target / f"node{self.node}.json", json.dumps(index).encode())
        self.persisted = (self.persisted + [step])[-2:]
        self.persist_report["newest"] = step
        mine = sorted(d for d in self.persist_dir.glob("step-*") if (d / f"node{self.node}.json").exists())
        for old in mine[:-2]:  # keep this node's two newest persisted steps
            (old / f"node{self.node}.json").unlink(missing_ok=True)
            for rank, _, _ in table:
                (old / f"rank{rank}.bin").unlink(missing_ok=True)
            try:
                old.rmdir()
            except OSError:
                pass


class _PoolBuffer(bytearray):
    """A buffer of :class:`_BufferPool` (the type tells its views from any other)."""


class _BufferPool:
    """Buffers for received chunks and parity blocks, reused once their step is dropped: a fresh
    multi-megabyte ``bytearray`` is zero-filled and faulted in page by page, every step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[_PoolBuffer] = []

    def take(self, nbytes: int) -> memoryview:
        with self._lock:
            fits = [b for b in self._free if nbytes <= len(b) <= 2 * nbytes + SLOT_SLACK]
            if fits:
                buf = min(fits, key=len)
                self._free.remove(buf)
            else:
                buf = _PoolBuffer(nbytes + SLOT_SLACK)
        return memoryview(buf)[:nbytes]

    def give(self, block: Any) -> None:
        """Return ``block`` (a view :meth:`take` made; anything else is ignored) for reuse."""
        buf = block.obj if isinstance(block, memoryview) else None
        if not isinstance(buf, _PoolBuffer):
            return
        with self._lock:
            if len(self._free) < POOL_KEEP and not any(b is buf for b in self._free):
                self._free.append(buf)


class _NodeBlob:
    """The concatenation of a node's rank blobs, viewed in their slot files (a context manager)."""

    def __init__(self, maps: SlotMaps, files: list[tuple[str, int]]) -> None:
        self.maps = maps
        self.files = files
        self.total = sum(n for _, n in files)
        self.views: list[memoryview] = []

    def __enter__(self) -> "_NodeBlob":
        for path, n in self.files:
            view = self.maps.view(path, n)
            if view is None:
                raise ValueError(f"slot {path} holds fewer than the {n} bytes its rank wrote")
            self.views.append(view)
        return self

    def __exit__(self, *exc: object) -> None:
        for view in self.views:
            view.release()
        self.views = []

    def pieces(self, a: int, b: int) -> list[memoryview]:
        """Byte range [a, b) as views into the slots (valid until the context exits)."""
        out, start = [], 0
        for view in self.views:
            lo, hi = max(a, start), min(b, start + len(view))
            if lo < hi:
                out.append(view[lo - start:hi - start])
            start += len(view)
        return out

    def read(self, a: int, b: int) -> bytes:
        return b"".join(self.pieces(a, b))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="dtrain snapshot process of one node")
    p.add_argument("--dir", required=True)
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--m", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--persist-dir")
    p.add_argument("--persist-every", type=int, default=0)
    p.add_argument("--idle-s", type=float, default=120.0)
    return p.parse_args(argv)


def lower_priority() -> None:
    """Schedule the calling thread, and the threads it starts, under ``SCHED_IDLE``: it runs when a
    core would otherwise idle (on Linux a thread's policy is its own). Niceness :data:`NICE` where
    that policy is unavailable."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        if os.nice(0) < NICE:
            os.nice(NICE - os.nice(0))


def run(args: argparse.Namespace) -> None:
    """Serve until shut down, idle or stopped (in whichever process or thread calls it), at the
    priority of :func:`lower_priority`."""
    lower_priority()
    key = (Path(args.dir) / "key").read_bytes()
    daemon = Daemon(args)
    try:
        daemon.serve(key)
    finally:
        daemon.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
