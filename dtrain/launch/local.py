"""Local launcher: run M simulated nodes x N ranks of a script on this machine.

Owns process management for ``dtrain launch``. It drives torch's elastic agent
(``LocalElasticAgent`` with a ``c10d`` rendezvous whose TCP stores listen on
127.0.0.1 only, on free ports), so
restarts (``max_restarts``), worker monitoring and group teardown are torchrun's.
On top of that it:

* redirects every rank's stdout/stderr to log files (torch ``LogsSpecs``) and
  follows them onto the launcher's stdout/stderr, each line prefixed ``[rank R] ``;
  carriage-return progress bars (tqdm) are redrawn in place on a terminal,
* fills in the dtrain environment contract (see :mod:`dtrain.launch.env`) and
  regroups ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``GROUP_RANK`` per simulated node,
* turns a failed run into one concise report: the rank that failed first (by the time its rank
  event reports, dtrain/launch/bootstrap.py; else the last moment it was seen alive), its exit
  code/signal and traceback tail; a usage error (exit status 2) is one line, never restarted,
* stops every rank on SIGINT/SIGTERM and returns 130/143.

All M*N ranks run under one agent; the nodes are simulated through the
environment only (rank r lives on node r // N). With ``--net`` (``LaunchSpec.net``) each node
is also a network namespace with a rate-limited link (dtrain.netns): the stores then bind the
host-side bridge address instead of 127.0.0.1, and every worker enters its node's namespace
through dtrain/launch/netns_exec.py before running the script.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import LogsDest, SignalException
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

from dtrain.errors import USAGE_EXIT_STATUS
from dtrain.launch import bootstrap, zygote
from dtrain.launch.env import FAILURE_TIME_VAR, RESTART_CAUSE_VAR, process_defaults
from dtrain.launch.ray_agent import RankExit
from dtrain.launch.reaper import Reaper

__all__ = [
    "LaunchSpec", "run_local", "format_failures", "dtrain_env", "contract_env", "process_defaults",
    "restart_env", "describe_failure", "RankLogFollowers", "exit_status", "signals_raise", "first_failure",
    "usage_report", "with_reported", "new_run_id",
]

_ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run",
                    "torch.multiprocessing.spawn")  # "Terminating process ... via signal SIGTERM"
_BAR_LOG_INTERVAL_S = 30.0  # progress-bar refreshes become a log line at most this often off a tty
_POLL_S = 0.05
_TORCH_SIGNALS_VAR = "TORCHELASTIC_SIGNALS_TO_HANDLE"


@dataclass
class LaunchSpec:
    """Everything ``run_local`` needs; built by the CLI."""

    script: str
    script_args: list[str] = field(default_factory=list)
    nproc: int = 1
    nodes: int = 1
    metrics: str | None = None
    overrides: list[str] = field(default_factory=list)
    config: str | None = None
    max_restarts: int = 0
    collective_timeout_s: float | None = None
    """``--collective-timeout-s``: comm.timeout_s of every rank (DTRAIN_TIMEOUT_S); not a job time limit."""
    inject: list[str] = field(default_factory=list)
    progress: bool = True
    shutdown_timeout_s: int = 5
    monitor_interval_s: float = 0.1
    net: str | None = None
    """``bw=RATE[,latency=T][,burst=B]``: put each node in its own network namespace (dtrain.netns)."""
    start_method: str = "forkserver"
    """``forkserver``: ranks are forks of a server with torch preloaded (dtrain.launch.zygote);
    ``spawn``: each rank is a fresh interpreter. Runs with ``net`` always spawn (a rank enters its
    node's namespace before Python starts)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc


def contract_env(spec: LaunchSpec) -> dict[str, str]:
    """The DTRAIN_* variables of the env contract (dtrain.launch.env) for ``spec``."""
    env: dict[str, str] = {
        "DTRAIN_NODES": str(spec.nodes),
        "DTRAIN_NPROC": str(spec.nproc),
        "DTRAIN_OVERRIDES": json.dumps(list(spec.overrides)),
        "DTRAIN_PROGRESS": "1" if spec.progress else "0",
    }
    if spec.metrics is not None:
        env["DTRAIN_METRICS"] = spec.metrics
    if spec.config is not None:
        env["DTRAIN_CONFIG"] = spec.config
    if spec.collective_timeout_s is not None:
        env["DTRAIN_TIMEOUT_S"] = repr(float(spec.collective_timeout_s))
    if spec.inject:
        env["DTRAIN_INJECT"] = json.dumps(list(spec.inject))
    return env


def restart_env(attempt: int, max_restarts: int, cause: str | None = None,
                failure_time: float | None = None) -> dict[str, str]:
    """torchrun's restart counters plus the cause and time of the failure that led to ``attempt``."""
    env = {"TORCHELASTIC_RESTART_COUNT": str(attempt), "TORCHELASTIC_MAX_RESTARTS": str(max_restarts)}
    if attempt and cause:
        env[RESTART_CAUSE_VAR] = " ".join(cause.split())  # one line
    if attempt and failure_time is not None:
        env[FAILURE_TIME_VAR] = repr(float(failure_time))
    return env


def dtrain_env(spec: LaunchSpec) -> dict[str, str]:
    """The dtrain variables (plus process defaults) every rank of the local launcher receives."""
    has_lo = "lo" in {name for _, name in socket.if_nameindex()}
    return {**contract_env(spec), **process_defaults("lo" if has_lo else None)}  # gloo on loopback


def describe_failure(rank: int, exitcode: int) -> str:
    """``rank 3 exited with code 1`` / ``rank 3 was killed by SIGKILL``."""
    return f"rank {rank} {_describe_exit(exitcode)}"


# --------------------------------------------------------------------------- output


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Console:
    """Serialises prefixed rank output; keeps at most one progress bar drawn on a tty."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bar: tuple[object, TextIO, str] | None = None  # (owner, stream, text)
        self._last_bar_log: dict[object, float] = {}

    def _erase_bar(self) -> None:
        if self._bar is not None:
            _, stream, _ = self._bar
            stream.write("\r\x1b[K")
            stream.flush()

    def _draw_bar(self) -> None:
        if self._bar is not None:
            _, stream, text = self._bar
            stream.write("\r" + text)
            stream.flush()

    def line(self, owner: object, stream: TextIO, text: str) -> None:
        with self._lock:
            self._erase_bar()
            if self._bar is not None and self._bar[0] is owner:
                self._bar = None  # the line completes this owner's bar
            stream.write(text + "\n")
            stream.flush()
            self._draw_bar()

    def bar(self, owner: object, stream: TextIO, text: str) -> None:
        with self._lock:
            if _isatty(stream):
                self._erase_bar()
                self._bar = (owner, stream, text)
                self._draw_bar()
                return
            now = time.monotonic()
            if now - self._last_bar_log.get(owner, -_BAR_LOG_INTERVAL_S) >= _BAR_LOG_INTERVAL_S:
                self._last_bar_log[owner] = now
                stream.write(text + "\n")
                stream.flush()

    def clear_bar(self, owner: object) -> None:
        with self._lock:
            if self._bar is not None and self._bar[0] is owner:
                self._erase_bar()
                self._bar = None


def _last_segment(data: bytes) -> str:
    """What a terminal would show for ``data``: the last non-blank ``\\r``-separated segment."""
    for seg in reversed(data.split(b"\r")):
        text = seg.decode("utf-8", errors="replace").rstrip()
        if text.strip():
            return text
    return ""


class _FileFollower(threading.Thread):
    """Follows one rank's log file and copies it, prefixed, to a console stream."""

    def __init__(self, path: str, prefix: str, stream: TextIO, console: _Console,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(name=f"dtrain-tail-{os.path.basename(path)}", daemon=True)
        self.path = path
        self.prefix = prefix
        self.stream = stream
        self.console = console
        self.on_event = on_event  # rank-event lines (dtrain.launch.bootstrap) go here, not to the console
        self.finished = threading.Event()
        self._buf = b""

    def _consume(self, chunk: bytes) -> None:
        buf = self._buf + chunk
        while (end := buf.find(b"\n")) >= 0:
            line, buf = buf[:end], buf[end + 1 :]
            text = _last_segment(line) if b"\r" in line else line.decode("utf-8", errors="replace")
            event = bootstrap.parse_rank_event(text) if self.on_event is not None else None
            if event is not None:
                self.on_event(event)
                continue
            self.console.line(self, self.stream, self.prefix + text.rstrip("\r"))
        if b"\r" in buf:  # a progress bar redrawn in place: keep only the current state
            buf = buf[buf.rfind(b"\r") :]
            current = _last_segment(buf)
            if current:
                self.console.bar(self, self.stream, self.prefix + current)
            else:
                self.console.clear_bar(self)
        self._buf = buf

    def run(self) -> None:
        while not os.path.exists(self.path):
            if self.finished.wait(_POLL_S):
                if not os.path.exists(self.path):
                    return
        with open(self.path, "rb") as fh:
            while True:
                done = self.finished.is_set()  # read once more after the writer is gone
                chunk = fh.read(1 << 16)
                if chunk:
                    self._consume(chunk)
                elif done:
                    break
                else:
                    time.sleep(_POLL_S)
        rest = _last_segment(self._buf)
        self.console.clear_bar(self)
        if rest:
            self.console.line(self, self.stream, self.prefix + rest)


class RankLogFollowers:
    """Follows per-rank log files onto the launcher's streams (``[rank R] `` prefix, one bar)."""

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self._console = _Console()
        self._followers: list[_FileFollower] = []
        self.stderr_paths: dict[int, str] = {}  # global rank -> stderr log of the latest attempt
        self.events: dict[int, dict[str, Any]] = {}
        """Global rank -> the rank event (dtrain.launch.bootstrap) of the latest attempt; complete
        once :meth:`stop_following` has returned."""

    def follow(self, rank: int, stdout_path: str | None, stderr_path: str | None) -> None:
        prefix = f"[rank {rank}] "
        self.events.pop(rank, None)

        def record(event: dict[str, Any]) -> None:
            self.events[rank] = event

        for path, stream, on_event in ((stdout_path, self.stdout, None), (stderr_path, self.stderr, record)):
            if path and path != os.devnull:
                follower = _FileFollower(path, prefix, stream, self._console, on_event)
                follower.start()
                self._followers.append(follower)
        if stderr_path:
            self.stderr_paths[rank] = stderr_path

    def stop_following(self, timeout_s: float = 10.0) -> None:
        for follower in self._followers:
            follower.finished.set()
        for follower in self._followers:
            follower.join(timeout_s)
        self._followers = []


class _PrefixedLogsSpecs(DefaultLogsSpecs):
    """Redirect each rank's std streams to files and follow them onto the console.

    ``reify`` is called by the agent once per attempt (restart), before the
    workers start; the followers of the previous attempt are drained first.
    """

    def __init__(self, log_dir: str, stdout: TextIO, stderr: TextIO) -> None:
        super().__init__(log_dir=log_dir, redirects=Std.ALL, tee=Std.NONE)
        self.followers = RankLogFollowers(stdout, stderr)
        self.stderr_paths = self.followers.stderr_paths

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        self.stop_following()
        dest = super().reify(envs)
        for local_rank, env in sorted(envs.items()):
            self.followers.follow(int(env.get("RANK", local_rank)), dest.stdouts.get(local_rank),
                                  dest.stderrs.get(local_rank))
        return dest

    def stop_following(self, timeout_s: float = 10.0) -> None:
        self.followers.stop_following(timeout_s)


# --------------------------------------------------------------------------- rendezvous


def _loopback_store(host: str = "127.0.0.1") -> dist.TCPStore:
    """A TCPStore server listening on ``host`` only (127.0.0.1, or the --net bridge), on a free port.

    torch's own store servers listen on every interface; handing TCPStore a
    socket we bound to loopback (``master_listen_fd``) keeps them local.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
        port = int(sock.getsockname()[1])
    except OSError:
        sock.close()
        raise
    return dist.TCPStore(
        host, port, is_master=True, multi_tenant=True, master_listen_fd=sock.detach(), wait_for_workers=False
    )


def _loopback_rendezvous(run_id: str, host: str = "127.0.0.1") -> RendezvousHandler:
    """c10d rendezvous for one agent whose stores (rendezvous and workers') bind ``host`` only."""
    store = _loopback_store(host)
    params = RendezvousParameters(
        backend="c10d",
        endpoint=f"{host}:{store.port}",
        run_id=run_id,
        min_nodes=1,
        max_nodes=1,
        local_addr=host,
    )
    handler = create_handler(store, C10dRendezvousBackend(store, run_id), params)
    # The handler creates the workers' store with this (private, torch 2.13) factory;
    # the port it is given is ignored in favour of a loopback-bound one.
    if hasattr(handler, "_create_tcp_store_server"):
        handler._create_tcp_store_server = lambda _addr, _port: _loopback_store(host)  # type: ignore[method-assign]
    return handler


# --------------------------------------------------------------------------- agent


class _SimulatedNodesAgent(LocalElasticAgent):
    """LocalElasticAgent that regroups its workers into simulated nodes and adds the dtrain env."""

    def __init__(self, *args: Any, nproc: int, nodes: int, extra_env: dict[str, str], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._dtrain_nproc = nproc
        self._dtrain_nodes = nodes
        self._dtrain_env = extra_env
        self.exits: dict[int, RankExit] = {}
        """Every rank that had exited non-zero when the agent saw the group fail (torch reports one)."""
        self._alive_at = time.time()  # when the last healthy poll began: every rank was alive then

    def _monitor_workers(self, worker_group: Any) -> Any:
        polled = time.time()
        result = super()._monitor_workers(worker_group)
        if result.is_failed():
            codes = _exit_codes(self._pcontext)
            now = time.time()
            self.exits = {worker_group.workers[i].global_rank: RankExit(worker_group.workers[i].global_rank, code,
                                                                        now, alive_at=self._alive_at)
                          for i, code in codes.items() if code}
        else:
            self._alive_at = polled
        return result

    # Hook called by LocalElasticAgent._start_workers for each worker's env (torch 2.13).
    def _set_local_rank_env(self, worker_env: dict[str, str | None], local_rank: int, spec: WorkerSpec) -> None:
        super()._set_local_rank_env(worker_env, local_rank, spec)
        rank = int(worker_env.get("RANK") or local_rank)
        node = str(rank // self._dtrain_nproc)
        worker_env.update(
            LOCAL_RANK=str(rank % self._dtrain_nproc),
            LOCAL_WORLD_SIZE=str(self._dtrain_nproc),
            GROUP_RANK=node,
            NODE_RANK=node,
            GROUP_WORLD_SIZE=str(self._dtrain_nodes),
        )
        worker_env.update(self._dtrain_env)  # includes the launcher's attempt count and restart cause
        for key, value in os.environ.items():  # as a subprocess would inherit it (a forked rank
            worker_env.setdefault(key, value)  # otherwise sees the fork server's older copy)


def _exit_codes(pcontext: Any) -> dict[int, int | None]:
    """Local rank -> exit code (None: running) of every worker of torch's process context.

    torch's own failure report holds only the lowest local rank that had died (fork server
    start), which need not be the one that died first. Private torch 2.13 attributes, so an
    unknown context yields nothing and the caller keeps torch's report.
    """
    mp_context = getattr(pcontext, "_pc", None)
    if mp_context is not None:
        return {i: p.exitcode for i, p in enumerate(mp_context.processes)}
    handlers = getattr(pcontext, "subprocess_handlers", None) or {}
    return {i: h.proc.poll() for i, h in handlers.items()}


def _quiet_elastic_logging() -> None:
    """Silence the elastic agent's loggers unless DTRAIN_LOG_LEVEL asks for more.

    torch's elastic loggers each get an explicit level when created, so every
    existing one is set (call this after the agent and rendezvous are built).
    """
    level = logging.getLevelName(os.environ.get("DTRAIN_LOG_LEVEL", "CRITICAL").upper())
    if not isinstance(level, int):
        level = logging.CRITICAL
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(_ELASTIC_LOGGERS):
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def signals_raise(reaper: "Reaper | None" = None) -> Iterator[Callable[[], None]]:
    """Turn SIGINT/SIGTERM into SignalException until the block ends.

    With a ``reaper`` (dtrain.launch.reaper) the first signal also arms its watchdog, and a later
    one makes it kill every rank at once instead of raising again in the middle of the clean-up.
    torch's elastic agent is kept from replacing these handlers (TORCHELASTIC_SIGNALS_TO_HANDLE).
    The block gets a function that installs the handlers again, for after a library replaced them
    (``ray.init`` installs a handler that aborts the driver on SIGTERM).
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum: int, _frame: Any) -> None:
        if reaper is not None and not reaper.on_signal(signum):
            return
        raise SignalException(f"received {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.getsignal(s) for s in sigs}
    previous_env = os.environ.get(_TORCH_SIGNALS_VAR)
    os.environ[_TORCH_SIGNALS_VAR] = "SIGQUIT"  # the agent's PContext.start installs handlers for these

    def install() -> None:
        for s in sigs:
            signal.signal(s, handler)

    install()
    try:
        yield install
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if previous_env is None:
            os.environ.pop(_TORCH_SIGNALS_VAR, None)
        else:
            os.environ[_TORCH_SIGNALS_VAR] = previous_env


# --------------------------------------------------------------------------- failures


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _traceback_tail(text: str, max_lines: int) -> str:
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip() and bootstrap.parse_rank_event(ln) is None]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if starts:
        lines = lines[starts[-1] :]
    return "\n".join(lines[-max_lines:])


def _file_tail(path: str | None, limit: int = 64_000) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - limit))
        return fh.read().decode("utf-8", errors="replace")


def failed_at(rank: int, failure: Any, events: Mapping[int, Mapping[str, Any]] | None = None) -> float:
    """When ``rank`` failed: the time its rank event reports (dtrain.launch.bootstrap), else the
    last moment it was seen alive (``alive_at``: the earliest it can have died, e.g. of a
    signal), else the time its exit was noticed."""
    event = (events or {}).get(rank) or {}
    if isinstance(event.get("failed_at"), (int, float)):
        return float(event["failed_at"])
    alive_at = getattr(failure, "alive_at", None)
    return float(alive_at if alive_at is not None else getattr(failure, "timestamp", 0) or 0)


def first_failure(failures: dict[int, Any], events: Mapping[int, Mapping[str, Any]] | None = None) -> int:
    """The rank that failed first, so the one that caused the failure.

    Ranks torn down by the launcher die of SIGTERM after the culprit, so real errors
    (non-SIGTERM) come first, then the earliest :func:`failed_at` (a peer that only saw the
    knock-on gloo error fails after the culprit, however loud its traceback), then the rank.
    """

    def key(rank: int) -> tuple[bool, float, int]:
        failure = failures[rank]
        teardown = failure.exitcode == -int(signal.SIGTERM)
        return (teardown, failed_at(rank, failure, events), rank)

    return min(failures, key=key)


def with_reported(failures: dict[int, Any], events: Mapping[int, Mapping[str, Any]] | None = None) -> dict[int, Any]:
    """``failures`` plus the ranks whose rank event reports a failure but that were still exiting
    (atexit handlers, teardown) when the launcher stopped the group: a rank that raised first may
    leave after the peer that only saw the knock-on error. Such a rank counts with the status it
    reported, not the SIGTERM that ended it."""
    out = dict(failures)
    for rank, event in (events or {}).items():
        status, when = event.get("status"), event.get("failed_at")
        if not isinstance(status, int) or not status or not isinstance(when, (int, float)):
            continue
        if rank not in out or out[rank].exitcode == -int(signal.SIGTERM):
            out[rank] = RankExit(rank, status, float(when))
    return out


def usage_report(failures: dict[int, Any], events: Mapping[int, Mapping[str, Any]] | None = None) -> str | None:
    """The one-line report of a job whose ranks failed on a usage error, or None.

    A rank exiting with :data:`dtrain.errors.USAGE_EXIT_STATUS` (``dtrain.UsageError``,
    ``dtrain.ConfigError``, or the script's own argparse) failed on input only the user can fix:
    the launcher prints the first such rank's line once and restarts nothing.
    """
    usage = {r: f for r, f in failures.items() if f.exitcode == USAGE_EXIT_STATUS}
    if not usage:
        return None
    first = first_failure(usage, events)
    line = ((events or {}).get(first) or {}).get("line")
    if isinstance(line, str) and line:
        return line
    return (f"dtrain: rank {first} exited with status {USAGE_EXIT_STATUS} (a usage error, e.g. from the "
            "script's own argument parsing: see its output above)")


def _error_file_traceback(failure: Any) -> str:
    """Traceback recorded by ``torch.distributed.elastic.multiprocessing.errors.record``, if any."""
    data = getattr(failure, "error_file_data", None)
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        extra = message.get("extraInfo") or {}
        return str(extra.get("py_callstack") or message.get("message") or "")
    if isinstance(message, str) and message != "<NONE>":
        return message
    return ""


def format_failures(failures: dict[int, Any], stderr_paths: dict[int, str] | None = None, max_lines: int = 3,
                    events: Mapping[int, Mapping[str, Any]] | None = None) -> str:
    """One concise report: failed ranks with exit code/signal, then the first failure's traceback tail.

    ``failures`` maps global rank -> a ``RankExit`` or torch's ``ProcessFailure`` (``exitcode``,
    ``timestamp``, optional ``alive_at`` and ``error_file_data``); ``stderr_paths`` maps global
    rank -> its stderr log; ``events`` global rank -> its rank event.
    """
    if not failures:
        return "dtrain: job failed (no per-rank failure information)"
    first = first_failure(failures, events)
    head = f"dtrain: job failed: rank {first} {_describe_exit(failures[first].exitcode)}"
    others = [f"rank {r} {_describe_exit(failures[r].exitcode)}" for r in sorted(failures) if r != first]
    if others:
        head += " (also " + ", ".join(others) + ")"
    tail = _error_file_traceback(failures[first]) or _file_tail((stderr_paths or {}).get(first))
    tail = _traceback_tail(tail, max_lines)
    if not tail:
        return head
    return head + "\n" + "\n".join(f"  [rank {first}] {ln}" for ln in tail.splitlines())


def exit_status(failures: dict[int, Any]) -> int:
    codes = [f.exitcode for f in failures.values()]
    positive = [c for c in codes if c > 0]
    if positive:
        return min(positive[0], 255)
    signals = [-c for c in codes if c < 0 and c != -int(signal.SIGTERM)] or [-c for c in codes if c < 0]
    return 128 + signals[0] if signals else 1


# --------------------------------------------------------------------------- entry


def _run_attempt(spec: LaunchSpec, logs: "_PrefixedLogsSpecs", host: str, args: tuple[str, ...],
                 env: dict[str, str], rdzv_id: str, start_method: str) -> dict[int, Any] | None:
    """One attempt of the job on a fresh elastic agent (torch restarts nothing itself): None when
    every rank succeeded, else global rank -> how it failed (``RankExit`` or torch's report)."""
    worker_spec = WorkerSpec(
        role="dtrain",
        local_world_size=spec.world_size,
        entrypoint=zygote.run_script if start_method == "forkserver" else sys.executable,
        args=args,
        rdzv_handler=_loopback_rendezvous(rdzv_id, host),
        max_restarts=0,
        monitor_interval=spec.monitor_interval_s,
        local_addr=host,
    )
    agent = _SimulatedNodesAgent(
        spec=worker_spec,
        logs_specs=logs,
        start_method=start_method,
        shutdown_timeout=spec.shutdown_timeout_s,
        nproc=spec.nproc,
        nodes=spec.nodes,
        extra_env=env,
    )
    _quiet_elastic_logging()
    result = agent.run()
    if not result.is_failed():
        return None
    return dict(agent.exits or result.failures)


def new_run_id() -> str:
    """A launch's run id: names its network namespaces, snapshot run directory and records."""
    return f"dtrain-{uuid.uuid4().hex[:12]}"


def run_local(spec: LaunchSpec, stdout: TextIO | None = None, stderr: TextIO | None = None,
              exit_on_signal: bool = False) -> int:
    """Run the job described by ``spec``; return the launcher's exit status.

    0 when every rank succeeds; the first failing rank's exit code (or 128+signal)
    otherwise; 130/143 when the launcher is stopped by SIGINT/SIGTERM (every rank and its
    children are gone within about 2 s of the signal; the launcher exits by 6 s: dtrain.launch.reaper).
    With ``exit_on_signal`` (the CLI) a stopped launcher ends with ``os._exit`` once its clean-up
    is done, instead of returning.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    start_method = "spawn" if spec.net else spec.start_method
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {spec.start_method!r}")
    run_id = new_run_id()
    log_dir = tempfile.mkdtemp(prefix="dtrain-launch-")
    logs = _PrefixedLogsSpecs(log_dir, out, err)
    hosts: Any = None
    host, extra_env = "127.0.0.1", dtrain_env(spec)
    extra_env["DTRAIN_RUN_ID"] = run_id  # stable across attempts: snapshot processes, fault markers
    from dtrain.snapshot.secret import SECRET_VAR, new_secret  # the job's secret (SECURITY.md)

    extra_env[SECRET_VAR] = new_secret()

    def cleanup() -> None:
        from dtrain.snapshot.client import remove_run

        remove_run(run_id)
        if hosts is not None:
            hosts.teardown()

    reaper = Reaper(last_cleanup=cleanup)
    # forkserver: zygote.run_script(script, ...); spawn: python -m dtrain.launch.bootstrap script ...
    args = (spec.script, *spec.script_args) if start_method == "forkserver" else \
        ("-m", bootstrap.MODULE, spec.script, *spec.script_args)
    with signals_raise(reaper):
        try:
            from dtrain.snapshot.client import claim_run

            claim_run(run_id)  # clears runs of launchers that died, records this one as the owner
            if start_method == "forkserver":
                zygote.start(process_defaults(None))  # at once unless the CLI started it already
            if spec.net:  # every node in its own namespace, inter-node links shaped (dtrain.netns)
                from dtrain import netns

                net = netns.parse_net_spec(spec.net)
                hosts = netns.create_hosts(spec.nodes, net["rate"], burst=net.get("burst"),
                                           latency=net.get("latency", "50ms"), prefix=netns.run_prefix(run_id))
                host = hosts.bridge_addr
                args = (netns.EXEC_WRAPPER, "--by-rank", *args)  # netns_exec runs "-m module" too
                extra_env.update(DTRAIN_NETNS_PREFIX=hosts.prefix, GLOO_SOCKET_IFNAME=netns.IFNAME)
            return _run_attempts(spec, logs, host, args, extra_env, run_id, start_method, err)
        except SignalException as exc:
            logs.stop_following()
            sig = signal.Signals(int(exc.sigval))
            print(f"dtrain: received {sig.name}, stopped all ranks", file=err, flush=True)
            return 128 + int(sig)
        except KeyboardInterrupt:
            logs.stop_following()
            print("dtrain: interrupted, stopped all ranks", file=err, flush=True)
            return 128 + int(signal.SIGINT)
        finally:
            logs.stop_following()
            shutil.rmtree(log_dir, ignore_errors=True)
            cleanup()
            reaper.done()
            if exit_on_signal:
                reaper.exit_if_signalled(128 + int(reaper.signal or 0))


def _run_attempts(spec: LaunchSpec, logs: "_PrefixedLogsSpecs", host: str, args: tuple[str, ...],
                  extra_env: dict[str, str], run_id: str, start_method: str, err: TextIO) -> int:
    """The attempts of one job (a fresh agent and rendezvous each, so nothing of a failed attempt,
    store keys, sockets or half-dead ranks, leaks into the next); returns the exit status."""
    failure: tuple[str, float] | None = None
    failures: dict[int, Any] | None = None
    for attempt in range(spec.max_restarts + 1):
        attempt_env = dict(extra_env, **restart_env(attempt, spec.max_restarts, *(failure or ())))
        failures = _run_attempt(spec, logs, host, args, attempt_env, f"{run_id}-{attempt}", start_method)
        if failures is None:
            break
        logs.stop_following()  # every rank event read
        failures = with_reported(failures, logs.followers.events)
        usage = usage_report(failures, logs.followers.events)
        if usage is not None:  # a restart would fail the same way
            print(usage, file=err, flush=True)
            return USAGE_EXIT_STATUS
        rank = first_failure(failures, logs.followers.events)
        failure = (describe_failure(rank, failures[rank].exitcode), time.time())
        if attempt < spec.max_restarts:
            print(f"dtrain: {failure[0]}; restarting all ranks (attempt {attempt + 1} of "
                  f"{spec.max_restarts})", file=err, flush=True)
    logs.stop_following()
    if failures is not None:
        print(format_failures(failures, logs.stderr_paths, events=logs.followers.events), file=err, flush=True)
        return exit_status(failures)
    return 0
