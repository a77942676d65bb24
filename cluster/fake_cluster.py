"""A fake multi-host Ray cluster on one machine: one network namespace per node (root, iproute2).

    python cluster/fake_cluster.py up --nodes 3 [--bw 1gbit] [--latency 1ms] [--cpus 2]   # blocks
    python cluster/fake_cluster.py exec -- dtrain launch --ray --address auto --nodes 2 train.py
    python cluster/fake_cluster.py cut 2        # take node 2's link down: a real node loss
    python cluster/fake_cluster.py down         # or Ctrl-C / SIGTERM the `up` process

``up`` builds the hosts with the slow-link harness of ``dtrain launch --net`` (dtrain/netns.py:
namespace ``dtrain-fc-n{k}`` with address 10.231.X.{k+2} (a free /24) on ``eth0``, a veth to the bridge
``dtrain-fc-br``, a ``tc tbf`` limit on both ends), starts ``ray start --head`` in node 0 and
``ray start`` workers in the others (each bound to its namespace address, token authentication
with a fresh token, dashboard off), writes the state to /tmp/dtrain-fake-cluster/state.json and
waits. Nothing is reachable from outside: the namespaces have no route off the bridge. ``exec``
runs a command inside node 0's namespace with the cluster's address and token in its
environment (``RAY_ADDRESS``), so ``--address auto`` finds it. Stopping ``up`` stops every Ray
process it started (by PID and by namespace) and deletes the namespaces, veths and bridge.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dtrain import netns  # noqa: E402

PREFIX = "dtrain-fc"
STATE_DIR = Path("/tmp/dtrain-fake-cluster")
STATE = STATE_DIR / "state.json"
PORT = 6379
HEALTH = '{"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}'


def _ray_env(token_path: Path) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(STATE_DIR / "tmp")}


def _ray_start(hosts: netns.Hosts, k: int, args: argparse.Namespace, env: dict[str, str]) -> subprocess.Popen:
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    cmd = ["ip", "netns", "exec", hosts.names[k], ray, "start", "--block", "--node-ip-address", hosts.addrs[k],
           "--num-cpus", str(args.cpus), "--temp-dir", str(STATE_DIR / "tmp" / f"n{k}"), "--disable-usage-stats"]
    if k == 0:
        cmd += ["--head", "--port", str(PORT), "--include-dashboard", "false", "--system-config", HEALTH]
    else:
        cmd += ["--address", f"{hosts.addrs[0]}:{PORT}"]
    log = open(STATE_DIR / f"node{k}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_nodes(address: str, hosts: netns.Hosts, n: int, env: dict[str, str], timeout_s: float = 120) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        res = subprocess.run(["ip", "netns", "exec", hosts.names[0], sys.executable, "-c", probe, address],
                             capture_output=True, text=True, env=env)  # hosts.exec cannot take env
        if res.returncode == 0 and res.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1.0)
    raise SystemExit(f"error: the fake cluster did not come up with {n} nodes within {timeout_s:.0f} s; "
                     f"see {STATE_DIR}/node*.log")


def _stop(procs: list[subprocess.Popen], hosts: netns.Hosts | None) -> None:
    for proc in procs:  # `ray start --block` stops its node's processes on SIGTERM
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    if hosts is not None:
        for name in hosts.names:  # anything left in our namespaces was started by us
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        hosts.teardown()


def up(args: argparse.Namespace) -> int:
    reason = netns.unavailable_reason()
    if reason:
        print(f"error: cannot build the fake cluster: {reason}", file=sys.stderr)
        return 2
    if STATE.exists():
        print(f"error: {STATE} exists: a fake cluster is up (run `down` first)", file=sys.stderr)
        return 2
    (STATE_DIR / "tmp").mkdir(parents=True, exist_ok=True)
    token = STATE_DIR / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _ray_env(token)
    hosts = netns.create_hosts(args.nodes, args.bw, latency=args.latency, prefix=PREFIX)
    procs: list[subprocess.Popen] = []
    stop = {"now": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        address = f"{hosts.addrs[0]}:{PORT}"
        procs.append(_ray_start(hosts, 0, args, env))
        time.sleep(3.0)  # the workers need the GCS
        procs += [_ray_start(hosts, k, args, env) for k in range(1, args.nodes)]
        _wait_nodes(address, hosts, args.nodes, env)
        STATE.write_text(json.dumps({"address": address, "namespaces": hosts.names, "addrs": hosts.addrs,
                                     "links": hosts.links, "token_path": str(token), "pid": os.getpid(),
                                     "ray_pids": [p.pid for p in procs]}))
        print(f"fake cluster up: {args.nodes} nodes {', '.join(hosts.addrs)}, link {args.bw}; "
              f"address {address}", flush=True)
        print(f"  python {sys.argv[0]} exec -- dtrain launch --ray --address {address} --nodes N script.py", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        _stop(procs, hosts)
        STATE.unlink(missing_ok=True)
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        print("fake cluster down", flush=True)
    return 0


def _state() -> dict:
    if not STATE.exists():
        raise SystemExit(f"error: no fake cluster is up ({STATE} missing); start one with `up`")
    return json.loads(STATE.read_text())


def exec_(args: argparse.Namespace) -> int:
    state = _state()
    cmd = list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    if not cmd:
        raise SystemExit("error: exec needs a command, e.g. exec -- dtrain launch --ray --address auto ...")
    env = {**_ray_env(Path(state["token_path"])), "RAY_ADDRESS": state["address"]}
    return subprocess.call(["ip", "netns", "exec", state["namespaces"][0], *cmd], env=env)


def cut(args: argparse.Namespace) -> int:
    state = _state()
    subprocess.run(["ip", "link", "set", state["links"][args.node], "down"], check=True)
    print(f"node {args.node} ({state['addrs'][args.node]}) cut off", flush=True)
    return 0


def down(_args: argparse.Namespace) -> int:
    state = _state()
    os.kill(state["pid"], signal.SIGTERM)
    for _ in range(120):
        if not STATE.exists():
            return 0
        time.sleep(0.5)
    print("error: the `up` process did not stop within 60 s", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd_name", required=True)
    u = sub.add_parser("up", help="build the namespaces, start Ray in them, wait (Ctrl-C tears down)")
    u.add_argument("--nodes", type=int, default=3)
    u.add_argument("--bw", default="1gbit", help="tc tbf rate of every node's link (e.g. 100mbit)")
    u.add_argument("--latency", default="50ms", help="tbf latency (queueing bound)")
    u.add_argument("--cpus", type=int, default=2, help="Ray CPUs each node offers")
    e = sub.add_parser("exec", help="run a command in node 0's namespace with RAY_ADDRESS and the token")
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    c = sub.add_parser("cut", help="take a node's link down (node loss)")
    c.add_argument("node", type=int)
    sub.add_parser("down", help="stop the `up` process (it tears everything down)")
    args = p.parse_args(argv)
    return {"up": up, "exec": exec_, "cut": cut, "down": down}[args.cmd_name](args)


if __name__ == "__main__":
    raise SystemExit(main())
