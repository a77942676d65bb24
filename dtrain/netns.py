"""Slow-link harness: simulated hosts as network namespaces joined by a shaped bridge.

Owns the lifecycle of everything it creates, and nothing else:

* one Linux bridge ``{prefix}-br`` with the host-side address ``10.231.X.1/24``, X being the first
  private /24 that no interface uses yet (so harnesses of concurrent jobs never share addresses);
* per node k a network namespace ``{prefix}-n{k}`` whose interface ``eth0`` (one end of a veth
  pair; the other end ``{prefix}-v{k}`` is enslaved to the bridge) has ``10.231.X.{k+2}/24``;
* a ``tc tbf`` qdisc on both ends of every veth: traffic leaving a node and traffic entering it
  are limited to ``rate`` (netem is not assumed to exist). Ranks of one node talk over the
  namespace's own loopback path, so only inter-node traffic is shaped.

Everything is deleted by :meth:`Hosts.teardown`, which also runs from ``atexit`` and on SIGTERM,
and on any failure half-way through :func:`create_hosts`. Names are per run (``dtrain launch``
uses :func:`run_prefix` of its run id), and each instance leaves an owner record
``netns-{prefix}.json`` (dtrain.runstate: creator PID and start time, what it created) in the
user's 0700 state directory, next to the lock that serialises subnet choice. A later
:func:`create_hosts` deletes what a record lists only when its owner has died (a run killed by
SIGKILL); the namespaces of a live job are never touched, and a name already claimed by a live
owner is an error. No traffic leaves the bridge: the
namespaces have no default route and the bridge is not connected to any other interface.

Rank processes enter their node's namespace with :mod:`dtrain.launch.netns_exec` before they
create a socket; :func:`spawn_ranks` starts them with the torchrun variables, ``MASTER_ADDR`` of
node 0 and ``GLOO_SOCKET_IFNAME=eth0``.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dtrain import runstate

SUBNET_BASE = "10.231"
EXEC_WRAPPER = str(Path(__file__).parent / "launch" / "netns_exec.py")  # run by path: no torch import
IFNAME = "eth0"
_LIVE: list["Hosts"] = []
_CMD_TIMEOUT_S = 20.0


class NetnsError(RuntimeError):
    """The slow-link harness cannot be built here (not root, no ``ip``/``tc``) or a command failed."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be created on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install the iproute2 package)"
    return None


def parse_rate_bits(rate: str) -> int:
    """``"100mbit"`` -> 100_000_000 (tc's units: bit, kbit, mbit, gbit; powers of 1000)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)\s*", rate.lower())
    if not m:
        raise ValueError(f"bandwidth {rate!r} must look like 100mbit or 1gbit")
    return int(float(m.group(1)) * {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}[m.group(2)])


def parse_net_spec(spec: str) -> dict[str, str]:
    """``"bw=100mbit,latency=20ms,burst=1mb"`` -> {"rate": ..., "latency": ..., "burst": ...}."""
    out: dict[str, str] = {}
    names = {"bw": "rate", "rate": "rate", "latency": "latency", "burst": "burst"}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in names or not value.strip():
            raise ValueError(f"--net {spec!r}: expected bw=RATE[,latency=T][,burst=B], got {item!r}")
        out[names[key.strip()]] = value.strip()
    if "rate" not in out:
        raise ValueError(f"--net {spec!r}: bw=RATE is required (e.g. bw=100mbit)")
    parse_rate_bits(out["rate"])
    return out


def default_burst(rate: str) -> str:
    """About 8 ms of traffic, at least 32 KB (1 Gbit -> ~1 MB, 100 Mbit -> ~100 KB)."""
    return f"{max(32 * 1024, parse_rate_bits(rate) // 8 // 125)}b"


def run_prefix(run_id: str) -> str:
    """The interface/namespace prefix of a launch: ``dt`` + 6 hex digits of its run id, short
    enough for Linux's 15-character interface names (``{prefix}-v{k}p``)."""
    digest = re.sub(r"[^0-9a-f]", "", run_id.lower())[-6:] or "0"
    return f"dt{digest}"


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(args)}` did not finish within {_CMD_TIMEOUT_S:g} s") from None
    if check and proc.returncode:
        raise NetnsError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclass
class Hosts:
    """The namespaces, addresses and shaping of one harness instance."""

    nodes: int
    prefix: str
    rate: str
    burst: str
    latency: str
    names: list[str] = field(default_factory=list)
    addrs: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    bridge: str = ""
    subnet: str = f"{SUBNET_BASE}.0"

    @property
    def bridge_addr(self) -> str:
        return f"{self.subnet}.1"
    _closed: bool = False

    def exec(self, node: int, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside node ``node``'s namespace (``ip netns exec``)."""
        return _run("ip", "netns", "exec", self.names[node], *cmd, check=check)

    def teardown(self) -> None:
        """Delete every namespace, veth and the bridge this instance created (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for link in self.links:
            _run("ip", "link", "del", link, check=False)  # deletes the peer in the namespace too
        for name in self.names:
            _run("ip", "netns", "del", name, check=False)
        if self.bridge:
            _run("ip", "link", "del", self.bridge, check=False)
        with contextlib.suppress(OSError, NetnsError):
            _record_path(self.prefix).unlink(missing_ok=True)
        if self in _LIVE:
            _LIVE.remove(self)

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.teardown()


def create_hosts(nodes: int, rate: str = "100mbit", *, burst: str | None = None, latency: str = "50ms",
                 prefix: str = "dtrain") -> Hosts:
    """Build ``nodes`` namespaces on a bridge with a ``tbf`` limit of ``rate`` on every link."""
    reason = unavailable_reason()
    if reason:
        raise NetnsError(f"cannot build the slow-link harness: {reason}")
    if not 1 <= nodes <= 200:
        raise NetnsError(f"nodes must be between 1 and 200, got {nodes}")
    parse_rate_bits(rate)
    hosts = Hosts(nodes, prefix, rate, burst or default_burst(rate), latency)
    _install_cleanup()
    _LIVE.append(hosts)
    try:
        hosts.bridge = f"{prefix}-br"
        with _locked():  # sweep, claim the names, choose-and-claim a subnet: atomic across processes
            _clear_stale(prefix, nodes)
            runstate.write_owner(_record_path(prefix), runstate.owner_record(prefix=prefix, nodes=nodes))
            _run("ip", "link", "add", hosts.bridge, "type", "bridge")
            hosts.subnet = _free_subnet()
            _run("ip", "addr", "add", f"{hosts.bridge_addr}/24", "dev", hosts.bridge)
        _run("ip", "link", "set", hosts.bridge, "up")
        for k in range(nodes):
            ns, host_end, ns_end, addr = f"{prefix}-n{k}", f"{prefix}-v{k}", f"{prefix}-v{k}p", f"{hosts.subnet}.{k + 2}"
            _run("ip", "netns", "add", ns)
            hosts.names.append(ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            hosts.links.append(host_end)
            _run("ip", "link", "set", host_end, "master", hosts.bridge)
            _run("ip", "link", "set", host_end, "up")
            _run("ip", "link", "set", ns_end, "netns", ns)
            hosts.exec(k, "ip", "link", "set", ns_end, "name", IFNAME)
            hosts.exec(k, "ip", "addr", "add", f"{addr}/24", "dev", IFNAME)
            hosts.exec(k, "ip", "link", "set", IFNAME, "up")
            hosts.exec(k, "ip", "link", "set", "lo", "up")
            hosts.addrs.append(addr)
            tbf = ("root", "tbf", "rate", rate, "burst", hosts.burst, "latency", latency)
            _run("tc", "qdisc", "add", "dev", host_end, *tbf)  # into the node
            hosts.exec(k, "tc", "qdisc", "add", "dev", IFNAME, *tbf)  # out of the node
    except BaseException:
        hosts.teardown()
        raise
    return hosts


def _free_subnet() -> str:
    """The first ``10.231.X`` /24 that no interface of this host has an address in."""
    used = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    for x in range(256):
        if f" {SUBNET_BASE}.{x}." not in used:
            return f"{SUBNET_BASE}.{x}"
    raise NetnsError(f"every {SUBNET_BASE}.X.0/24 subnet is in use; remove stale bridges (ip link del ...)")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """The harness lock, a file in the user's 0700 state directory (dtrain.runstate.state_root)."""
    import fcntl

    fd = os.open(runstate.state_root() / "netns.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _record_path(prefix: str) -> Path:
    return runstate.state_root() / f"netns-{prefix}.json"


def _delete_instance(prefix: str, nodes: int) -> None:
    for k in range(nodes):
        _run("ip", "link", "del", f"{prefix}-v{k}", check=False)
        _run("ip", "netns", "del", f"{prefix}-n{k}", check=False)
    _run("ip", "link", "del", f"{prefix}-br", check=False)


def _clear_stale(prefix: str, nodes: int) -> None:
    """Delete the instances whose owner died (their records say what they created), then make sure
    ``prefix`` is free: a live owner's name is an error, an unrecorded leftover of it is removed."""
    for path in runstate.state_root().glob("netns-*.json"):
        record = runstate.read_record(path)
        if record is None or runstate.owner_alive(record):
            continue
        stale, count = record.get("prefix"), record.get("nodes")
        if isinstance(stale, str) and isinstance(count, int):
            _delete_instance(stale, count)
        path.unlink(missing_ok=True)
    record = runstate.read_record(_record_path(prefix))
    if record is not None:
        raise NetnsError(f"the network namespaces {prefix}-* belong to a running job (pid {record.get('pid')}); "
                         "use another prefix")
    _delete_instance(prefix, nodes)  # unrecorded leftovers of this very name (older dtrain versions)


def leftovers(prefix: str = "dtrain") -> list[str]:
    """Namespaces and links named ``{prefix}-*`` that exist now (for tests of the cleanup)."""
    out = [n.split()[0] for n in _run("ip", "netns", "list", check=False).stdout.splitlines() if n.strip()]
    links = _run("ip", "-o", "link", "show", check=False).stdout.splitlines()
    out += [ln.split(":")[1].strip().split("@")[0] for ln in links if ":" in ln]
    return sorted(n for n in out if n.startswith(f"{prefix}-"))


_CLEANUP_INSTALLED = False


def _install_cleanup() -> None:
    global _CLEANUP_INSTALLED
    if _CLEANUP_INSTALLED:
        return
    _CLEANUP_INSTALLED = True
    atexit.register(_teardown_all)
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            _teardown_all()
            if callable(previous):
                previous(signum, frame)
            else:
                raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: atexit and finally blocks still clean up
        pass


def _teardown_all() -> None:
    for hosts in list(_LIVE):
        hosts.teardown()


def rank_env(hosts: Hosts, rank: int, world: int, nproc: int, port: int,
             master_addr: str | None = None) -> dict[str, str]:
    """The environment of one rank process placed on node ``rank // nproc``."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": str(rank // nproc),
            "MASTER_ADDR": master_addr or hosts.addrs[0], "MASTER_PORT": str(port),
            "DTRAIN_NODES": str(hosts.nodes), "DTRAIN_NPROC": str(nproc),
            "DTRAIN_NETNS": hosts.names[rank // nproc], "GLOO_SOCKET_IFNAME": IFNAME,
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def spawn_ranks(hosts: Hosts, nproc: int, argv: list[str], port: int = 29533,
                env: dict[str, str] | None = None, **popen: Any) -> list[subprocess.Popen]:
    """Start ``nodes * nproc`` rank processes, each inside its node's namespace, running ``argv``.

    ``argv`` is a script path plus its arguments, or ``["-m", "module", ...]``.
    """
    world = hosts.nodes * nproc
    procs = []
    try:
        for rank in range(world):
            full_env = {**os.environ, **(env or {}), **rank_env(hosts, rank, world, nproc, port)}
            cmd = [sys.executable, EXEC_WRAPPER, hosts.names[rank // nproc], *argv]
            procs.append(subprocess.Popen(cmd, env=full_env, **popen))
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Exit codes of ``procs``; on timeout or the first failure every other rank is killed."""
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any((p.poll() or 0) != 0 for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]
