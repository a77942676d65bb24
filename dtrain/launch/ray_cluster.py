"""The Ray side of ``dtrain launch --ray``: reach an existing cluster or start a private one.

Owns the driver's Ray session for one job:

* ``--address ADDR|auto``: check that the address answers and that the cluster requires Ray's
  token authentication (:func:`require_token_auth`; ``--insecure`` skips that), then ``ray.init``;
* no address (the embedded default): a Ray cluster of M nodes on this machine for this job only.
  Ray's servers listen on every interface and rewrite 127.0.0.1 to the external address, so the
  launcher first moves itself into a private network namespace that has nothing but ``lo``
  (:func:`isolate_loopback`); every Ray process and every rank inherits it, so nothing can
  listen beyond loopback. Token authentication is on, with a fresh token in a private file
  (never printed); the dashboard is off unless asked for; Ray's temp dir is private and
  removed afterwards. Node failures are detected within about 2 s (health checks every 0.5 s).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["RaySession", "RayUnavailable", "ray_session", "isolate_loopback", "check_address",
           "require_token_auth", "token_auth_enforced", "FAST_HEALTH_CHECKS"]

# GCS marks a node dead after ~3 missed 0.5 s checks instead of Ray's default ~15-30 s.
FAST_HEALTH_CHECKS: dict[str, int] = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500,
                                      "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


class RayUnavailable(RuntimeError):
    """Ray cannot be used for this job; the message says why and what to do."""


@dataclass
class RaySession:
    """A connected driver: where it is connected and whether this job owns the cluster."""

    address: str
    local: bool
    isolated: bool
    cluster: Any = None  # ray.cluster_utils.Cluster when local


def _bring_up(ifname: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sh22x", ifname.encode(), 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh22x", ifname.encode(), flags | _IFF_UP))


def isolate_loopback() -> str | None:
    """Move this process into a new network namespace with only ``lo`` (up); None on success.

    As root ``unshare(CLONE_NEWNET)`` does it; otherwise a user namespace (same uid inside)
    gives the capability, which needs a single-threaded process. Returns why it failed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err != errno.EPERM:
            return f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}"
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
            return f"cannot create a private network namespace: {os.strerror(ctypes.get_errno())}"
        try:
            for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                               ("/proc/self/gid_map", f"{gid} {gid} 1")):
                with open(path, "w") as fh:
                    fh.write(text)
        except OSError as exc:
            return f"cannot map ids in the user namespace: {exc}"
    try:
        _bring_up("lo")
    except OSError as exc:
        return f"cannot bring up lo in the private network namespace: {exc}"
    return None


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Raise RayUnavailable unless ``host:port`` accepts TCP connections (``auto`` is not checked)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailable(f"--address {address!r} must be HOST:PORT of the Ray head (GCS), or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {reason}; "
                             "is `ray start --head` running there, and is the port open?") from None


def token_auth_enforced(gcs_address: str, timeout_s: float = 5.0) -> tuple[bool | None, str]:
    """Whether the Ray cluster whose GCS listens at ``gcs_address`` enforces token authentication.

    Ray's client cannot say (``RAY_AUTH_MODE`` is this process's own setting), so ask the GCS
    itself: one harmless RPC (``GetClusterId``) without a token is refused with UNAUTHENTICATED
    when auth is on and answered when it is off. (None, why) when neither happens, e.g. a
    cluster with TLS.
    """
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(gcs_address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True, ""
            return None, f"{exc.code().name}: {_one_line(exc.details() or '')}"
    return False, ""


def require_token_auth(address: str) -> None:
    """Raise RayUnavailable unless the cluster at ``address`` (HOST:PORT or auto) enforces token auth."""
    hint = "or pass --insecure to use it anyway (see SECURITY.md)"
    if address.startswith("ray://"):
        raise RayUnavailable(f"cannot check whether the Ray Client address {address} requires token "
                             f"authentication; use the cluster's GCS address (HOST:PORT) {hint}")
    gcs = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        gcs = canonicalize_bootstrap_address("auto")
        if gcs is None:
            raise RayUnavailable("--address auto: no running Ray cluster found (RAY_ADDRESS is unset and "
                                 "this machine has no `ray start` cluster)")
    enforced, why = token_auth_enforced(gcs)
    if enforced is False:
        raise RayUnavailable(f"the Ray cluster at {address} does not require token authentication: anyone "
                             f"who can reach its ports can run code on it and read this job's secret; start "
                             f"it with RAY_AUTH_MODE=token {hint}")
    if enforced is None:
        raise RayUnavailable(f"cannot tell whether the Ray cluster at {address} requires token "
                             f"authentication ({why}); {hint}")


def _quiet_ray_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@contextlib.contextmanager
def _private_auth(tmp: str) -> Iterator[None]:
    """Token auth with a fresh token in a 0600 file under ``tmp`` (the user's ~/.ray is untouched)."""
    path = os.path.join(tmp, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    _reload_auth_config()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_auth_config()


def _reload_auth_config() -> None:
    """Make an already-imported Ray see the current RAY_AUTH_* variables (it caches them)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def ray_session(address: str | None, nodes: int, node_resources: dict[str, float], *,
                dashboard: bool = False, isolate: bool = True, runtime_env: dict[str, Any] | None = None,
                warn: Any = None, insecure: bool = False) -> Iterator[RaySession]:
    """Connect the driver for one job; a private ``nodes``-node cluster when ``address`` is None.

    ``node_resources`` ({"CPU": .., "GPU": ..}) is what each local node offers. ``warn`` is
    called with a message when local isolation is impossible (Ray then listens beyond loopback).
    ``insecure``: connect to ``address`` even when it does not enforce token authentication.
    """
    _quiet_ray_env()
    try:
        import ray
    except ImportError:
        raise RayUnavailable("`dtrain launch --ray` needs Ray: pip install 'dtrain[ray]'") from None
    init_kw: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": False}
    if runtime_env:
        init_kw["runtime_env"] = runtime_env
    if address is not None:
        check_address(address)
        if not insecure:
            require_token_auth(address)
        try:
            with _stderr_to(os.devnull):
                ray.init(address=address, **init_kw)
        except Exception as exc:  # ConnectionError, AuthenticationError, ...
            raise RayUnavailable(f"cannot connect to the Ray cluster at {address}: {_one_line(exc)}") from None
        try:
            yield RaySession(address=address, local=False, isolated=False)
        finally:
            ray.shutdown()
        return

    isolated = False
    if isolate:
        reason = isolate_loopback()
        isolated = reason is None
        if reason and warn is not None:
            warn(f"dtrain: warning: {reason}; the local Ray cluster's servers will listen on every "
                 "interface of this machine (token authentication stays on)")
    tmp = tempfile.mkdtemp(prefix="dtr-", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    os.makedirs(os.path.join(tmp, "ray"))
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    cluster = None
    try:
        with _private_auth(tmp):
            from ray.cluster_utils import Cluster

            node_args = {"num_cpus": node_resources.get("CPU", 1), "num_gpus": node_resources.get("GPU", 0),
                         "node_ip_address": "127.0.0.1"}
            try:
                with _stderr_to(os.path.join(tmp, "start.log")):
                    cluster = Cluster(initialize_head=True, head_node_args={
                        **node_args, "include_dashboard": dashboard, "dashboard_host": "127.0.0.1",
                        "_system_config": FAST_HEALTH_CHECKS, "temp_dir": os.path.join(tmp, "ray"),
                        # fewer processes to start: no log streaming (log_to_driver is off), no autoscaler
                        "include_log_monitor": False, "no_monitor": True})
                    for _ in range(nodes - 1):
                        cluster.add_node(wait=False, **node_args)
                    cluster.wait_for_nodes(timeout=120)
                    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", **init_kw)
            except Exception as exc:
                raise RayUnavailable(f"could not start a local {nodes}-node Ray cluster: {_one_line(exc)}") from None
            try:
                yield RaySession(address=cluster.address, local=True, isolated=isolated, cluster=cluster)
            finally:
                ray.shutdown()
    finally:
        if cluster is not None:
            cluster.shutdown()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _stderr_to(path: str) -> Iterator[None]:
    """Send this process's fd 2 to ``path`` (Ray's C++ start-up warnings are not the user's business)."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]

