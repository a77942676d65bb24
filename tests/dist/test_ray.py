"""``dtrain launch --ray`` end to end on real Ray nodes, every address inside a private namespace.

One Ray cluster is shared by the module: ``ray.cluster_utils.Cluster`` (a head with no CPUs, so
ranks never land on it, and three 2-CPU worker nodes, all on 127.0.0.1) runs in a network
namespace the fixture creates with nothing but ``lo``; every ``dtrain`` command joins that
namespace (``ip netns exec``). A small server holds the cluster and removes or adds worker nodes
on request (a removal kills the raylet: a real node loss). Reference runs use the local launcher.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from dtrain import netns

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = str(REPO / "examples" / "train_gpt.py")
try:
    import ray  # noqa: F401

    RAY_REASON = None
except ImportError:
    RAY_REASON = "ray is not installed (pip install -e '.[ray]')"
NETNS_REASON = netns.unavailable_reason()
if RAY_REASON is None and NETNS_REASON is not None:
    pytest.skip(f"Ray tests run Ray inside a private network namespace: {NETNS_REASON}", allow_module_level=True)
if RAY_REASON is not None:
    pytest.skip(RAY_REASON, allow_module_level=True)

SERVER = textwrap.dedent("""
    import json, sys
    from ray.cluster_utils import Cluster
    from dtrain.launch.ray_cluster import FAST_HEALTH_CHECKS
    common = dict(node_ip_address="127.0.0.1", num_cpus=2)
    c = Cluster(initialize_head=True, head_node_args=dict(node_ip_address="127.0.0.1", num_cpus=0,
                include_dashboard=False, _system_config=FAST_HEALTH_CHECKS, temp_dir=sys.argv[1]))
    workers = {}
    def add():
        node = c.add_node(wait=False, **common)
        workers[node.node_id] = node
    for _ in range(3):
        add()
    c.wait_for_nodes()
    print(json.dumps({"address": c.address, "workers": sorted(workers)}), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "remove":
            [nid] = [n for n in workers if n.startswith(args[0])]
            c.remove_node(workers.pop(nid), allow_graceful=False)
        elif cmd == "add":
            add()
            c.wait_for_nodes()
        elif cmd == "quit":
            break
        print(json.dumps({"ok": cmd, "workers": sorted(workers)}), flush=True)
    c.shutdown()
""")


class RayCluster:
    """The namespace, the cluster server and the environment every command here runs with."""

    def __init__(self) -> None:
        self.ns = f"dtrain-rt{os.getpid()}"
        self.tmp = tempfile.mkdtemp(prefix="dtr-", dir="/tmp")  # short: Ray's socket paths
        token = Path(self.tmp) / "auth_token"
        token.write_text(os.urandom(16).hex())
        token.chmod(0o600)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": self.tmp, "RAY_BACKEND_LOG_LEVEL": "error"}
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"], check=True)
        # An interface besides lo, as on a real machine: a job's own Ray must not be reachable on it.
        for cmd in ("ip link add ext0 type veth peer name ext1", "ip addr add 10.231.9.1/24 dev ext0",
                    "ip link set ext0 up", "ip link set ext1 up"):
            subprocess.run(["ip", "netns", "exec", self.ns, *cmd.split()], check=True)
        os.makedirs(f"{self.tmp}/ray")
        script = Path(self.tmp) / "server.py"
        script.write_text(SERVER)
        self.server = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, str(script), f"{self.tmp}/ray"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env,
                                       cwd=REPO)
        hello = json.loads(self.server.stdout.readline())
        self.address, self.workers = hello["address"], hello["workers"]

    def command(self, text: str) -> dict:
        assert self.server.stdin and self.server.stdout
        self.server.stdin.write(text + "\n")
        self.server.stdin.flush()
        reply = json.loads(self.server.stdout.readline())
        self.workers = reply["workers"]
        return reply

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m", "dtrain.launch.cli", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=REPO)

    def dtrain(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        proc = self.popen(*args)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def close(self) -> None:
        try:
            self.server.communicate("quit\n", timeout=60)
        except Exception:
            self.server.kill()
        # anything still running in our namespace was started by this module
        pids = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.ns], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster()
    try:
        yield c
    finally:
        c.close()


def _local(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtrain.launch.cli", "launch", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def _sha(proc: subprocess.CompletedProcess[str]) -> str:
    m = re.search(r"param_sha256 ([0-9a-f]{64})", proc.stderr)
    assert proc.returncode == 0 and m, proc.stdout[-3000:] + proc.stderr[-3000:]
    return m.group(1)


TRAIN = [EXAMPLE, "--model", "tiny", "--steps", "6", "--batch-size", "12", "--seed", "3"]


@pytest.mark.slow
def test_three_nodes_private_cluster_match_local(cluster: RayCluster, tmp_path: Path) -> None:
    """No --address: the job's own 3-node Ray (inside its own loopback namespace) vs the local launcher."""
    ref = _local("--nodes", "3", "--nproc", "1", "--no-progress", *TRAIN)
    script = tmp_path / "ifaces.py"
    script.write_text("import os, runpy, socket, sys\n"
                      "print('IFACES', sorted(n for _, n in socket.if_nameindex()), flush=True)\n"
                      f"sys.argv = [{EXAMPLE!r}] + sys.argv[1:]\n"
                      f"runpy.run_path({EXAMPLE!r}, run_name='__main__')\n")
    got = cluster.dtrain("launch", "--ray", "--nodes", "3", "--nproc", "1", "--no-progress", str(script), *TRAIN[1:])
    assert _sha(got) == _sha(ref)
    # the job (its ranks and every Ray process) lives in a namespace with nothing but loopback,
    # although the machine has another interface (ext0, 10.231.9.1)
    assert got.stdout.count("IFACES ['lo']") == 3, got.stdout
    assert "Failed to determine local IP" not in got.stderr  # Ray's own warnings stay quiet
    placed = re.findall(r"dtrain: node (\d) on 127\.0\.0\.1 \(Ray node ([0-9a-f]{8})\): ranks", got.stderr)
    assert sorted(n for n, _ in placed) == ["0", "1", "2"] and len({i for _, i in placed}) == 3, got.stderr


def test_two_nodes_two_ranks_match_local(cluster: RayCluster, tmp_path: Path) -> None:
    ref = _local("--nodes", "2", "--nproc", "2", "--no-progress", *TRAIN)
    script = tmp_path / "where.py"
    script.write_text("import os, runpy, sys\n"
                      "print('WHERE', *(os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'NODE_RANK', 'WORLD_SIZE', "
                      "'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'GLOO_SOCKET_IFNAME', 'DTRAIN_NODES')), flush=True)\n"
                      f"sys.argv = [{EXAMPLE!r}] + sys.argv[1:]\n"
                      f"runpy.run_path({EXAMPLE!r}, run_name='__main__')\n")
    got = cluster.dtrain("launch", "--ray", "--address", cluster.address, "--nodes", "2", "--nproc", "2",
                         "--no-progress", str(script), *TRAIN[1:])
    assert _sha(got) == _sha(ref)
    where = sorted(re.findall(r"\[rank (\d)\] WHERE (.*)", got.stdout))
    assert [w.split() for _, w in where] == [
        [str(r), str(r % 2), str(r // 2), "4", "2", "127.0.0.1", "lo", "2"] for r in range(4)], got.stdout
    # the two ranks of a node share its agent: one Ray node per NODE_RANK
    placed = dict(re.findall(r"dtrain: node (\d) on \S+ \(Ray node ([0-9a-f]{8})\)", got.stderr))
    assert len(placed) == 2 and len(set(placed.values())) == 2, got.stderr


def test_failing_rank_reports_its_traceback(cluster: RayCluster, tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import os, time\n"
                      "def explode():\n    raise ValueError('rank one exploded')\n"
                      "if os.environ['RANK'] == '1':\n    explode()\n"
                      "time.sleep(60)\n")
    start = time.monotonic()
    got = cluster.dtrain("launch", "--ray", "--address", cluster.address, "--nodes", "2", "--no-progress",
                         str(script))
    assert got.returncode == 1, got.stderr
    assert time.monotonic() - start < 50  # rank 0 was stopped, not waited for
    assert "dtrain: job failed: rank 1 exited with code 1" in got.stderr, got.stderr
    assert "[rank 1] ValueError: rank one exploded" in got.stderr
    assert re.search(r"\[rank 1\] .*in explode", got.stderr), got.stderr


def test_usage_error_is_one_line_and_not_restarted(cluster: RayCluster, tmp_path: Path) -> None:
    script = tmp_path / "usage.py"
    script.write_text("import os, dtrain\nprint('attempt', os.environ['TORCHELASTIC_RESTART_COUNT'], flush=True)\n"
                      "raise dtrain.UsageError('--widgets 3 must divide over 2 ranks')\n")
    got = cluster.dtrain("launch", "--ray", "--address", cluster.address, "--nodes", "2", "--no-progress",
                         "--max-restarts", "2", str(script))
    out = got.stdout + got.stderr
    assert got.returncode == 2, out
    assert out.count("--widgets 3 must divide over 2 ranks") == 1 and "Traceback" not in out, out
    assert "dtrain: error: --widgets 3 must divide over 2 ranks" in got.stderr.splitlines(), out
    assert "attempt 1" not in out and "restarting" not in out, out


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists():
            steps = [json.loads(ln).get("step", 0) for ln in metrics.read_text().splitlines()[:-1]]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def _node_loss_run(cluster: RayCluster, tmp_path: Path, restarts: int, steps: int,
                   *extra: str) -> tuple[subprocess.CompletedProcess[str], Path, str]:
    """Run the example, remove the Ray node that hosts NODE_RANK 1 after step 52, wait for the end.

    The checkpoint at step 50 is complete by then and the next one (100) far away: a node lost
    while ``checkpoint.save`` rewrites the directory leaves no complete checkpoint (the directory
    is a single slot), which is not what these tests are about.
    """
    metrics = tmp_path / "m.jsonl"
    proc = cluster.popen("launch", "--ray", "--address", cluster.address, "--nodes", "2", "--no-progress",
                         "--max-restarts", str(restarts), "--node-wait-s", "20", "--metrics", str(metrics),
                         "--set", f'checkpoint.dir="{tmp_path / "ckpt"}"', "--set", "checkpoint.every=50", *extra,
                         EXAMPLE, "--model", "tiny", "--steps", str(steps), "--batch-size", "12")
    try:
        victim = None
        assert proc.stderr is not None
        head = ""  # the placement lines come first on stderr, before any rank starts
        while victim is None:
            line = proc.stderr.readline()
            assert line, proc.communicate()
            head += line
            m = re.search(r"dtrain: node 1 on \S+ \(Ray node ([0-9a-f]{8})\)", head)
            victim = m.group(1) if m else None
        _wait_for_step(metrics, 52, proc)
        cluster.command(f"remove {victim}")
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, head + err), metrics, victim


@pytest.mark.slow
def test_node_loss_restarts_and_finishes(cluster: RayCluster, tmp_path: Path) -> None:
    steps = 90
    got, metrics, victim = _node_loss_run(cluster, tmp_path, restarts=1, steps=steps)
    cluster.command("add")  # back to three workers for the other tests
    assert got.returncode == 0, got.stderr[-4000:]
    assert re.search(rf"dtrain: node 1 \(127\.0\.0\.1\) lost; restarting all ranks \(restart 1 of 1\)", got.stderr), got.stderr
    m = re.search(r"\[rank 0\] dtrain: resumed .*?at step (\d+)", got.stderr)
    assert m and int(m.group(1)) == 50, got.stderr[-3000:]
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert records[-1]["summary"] and records[-1]["steps"] == steps and records[-1]["restarts"] == 1
    [event] = [r for r in records if r.get("event") == "restart"]  # written by the engine from our env
    assert event["cause"] == "node 1 (127.0.0.1) lost" and event["resumed_from_step"] == int(m.group(1))
    assert 0 < event["recovery_s"] < 120


@pytest.mark.slow
def test_min_nodes_continues_on_the_nodes_left(cluster: RayCluster, tmp_path: Path) -> None:
    """3 nodes on the 3 workers; one is removed and none replaces it: go on with 2 (world 3 -> 2)."""
    got, metrics, _ = _node_loss_run(cluster, tmp_path, 1, 90, "--nodes", "3", "--min-nodes", "2")
    cluster.command("add")
    assert got.returncode == 0, got.stderr[-4000:]
    assert "dtrain: continuing on 2 of 3 nodes (--min-nodes 2); lost: node 1 (127.0.0.1, Ray node" in got.stderr
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert records[-1]["summary"] and records[-1]["steps"] == 90
    assert re.search(r"\[rank 0\] dtrain: resumed at step 50 ", got.stderr), got.stderr[-3000:]
    [event] = [r for r in records if r.get("event") == "restart"]
    assert event["resumed_from_step"] == 50 and event["cause"] == "node 1 (127.0.0.1) lost"


def test_node_loss_without_restarts_names_the_node(cluster: RayCluster, tmp_path: Path) -> None:
    got, _, victim = _node_loss_run(cluster, tmp_path, restarts=0, steps=2000)
    cluster.command("add")
    assert got.returncode != 0
    assert re.search(rf"dtrain: job failed: node 1 \(127\.0\.0\.1, Ray node {victim}\) lost", got.stderr), got.stderr
    assert "no restarts left (--max-restarts 0)" in got.stderr


def test_more_nodes_than_the_cluster_fails_naming_what_is_missing(cluster: RayCluster) -> None:
    got = cluster.dtrain("launch", "--ray", "--address", cluster.address, "--nodes", "5", "--node-wait-s", "2",
                         EXAMPLE, timeout=120)
    assert got.returncode == 1
    assert "cannot place 5 node(s) x 1 rank(s): each node needs {CPU: 1}" in got.stderr, got.stderr
    assert "the Ray cluster has 3 alive node(s) that fit" in got.stderr and "--min-nodes" in got.stderr


def test_unreachable_address_is_a_clear_error(cluster: RayCluster) -> None:
    got = cluster.dtrain("launch", "--ray", "--address", "127.0.0.1:9", EXAMPLE, timeout=60)
    assert got.returncode == 1
    assert "dtrain: error: cannot reach the Ray cluster at 127.0.0.1:9" in got.stderr, got.stderr
    assert "Traceback" not in got.stderr


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_ctrl_c_or_dead_driver_stops_every_rank(cluster: RayCluster, tmp_path: Path, sig: signal.Signals) -> None:
    script = tmp_path / "sleep.py"
    script.write_text("import os, time\nprint('PID', os.getpid(), flush=True)\ntime.sleep(120)\n")
    proc = cluster.popen("launch", "--ray", "--address", cluster.address, "--nodes", "2", "--no-progress", str(script))
    pids: dict[str, int] = {}
    assert proc.stdout is not None
    while len(pids) < 2:
        line = proc.stdout.readline()
        assert line, proc.communicate()
        m = re.match(r"\[rank (\d)\] PID (\d+)", line)
        if m:
            pids[m.group(1)] = int(m.group(2))
    proc.send_signal(sig)  # `ip netns exec` execs: this is the launcher itself
    out, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "dtrain: received SIGINT, stopped all ranks" in err, err
    assert all(_gone(pid) for pid in pids.values()), pids


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_fake_cluster_script_runs_a_job_on_separate_hosts(tmp_path: Path) -> None:
    """cluster/fake_cluster.py: up (2 namespace hosts, 1 Gbit tbf links, Ray head + worker), exec a
    2-node job with --address auto, down; the job matches the local launcher and its nodes are two
    different host addresses."""
    script = REPO / "cluster" / "fake_cluster.py"
    if Path("/tmp/dtrain-fake-cluster/state.json").exists():
        pytest.skip("a fake cluster is already up on this machine")
    ref = _local("--nodes", "2", "--nproc", "1", "--no-progress", *TRAIN)
    up = subprocess.Popen([sys.executable, str(script), "up", "--nodes", "2", "--cpus", "1", "--bw", "1gbit"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                          start_new_session=True)
    try:
        assert up.stdout is not None
        seen = []
        for line in up.stdout:  # blocks until the cluster is up (or `up` failed and closed stdout)
            seen.append(line)
            if line.startswith("fake cluster up"):
                break
        assert seen and seen[-1].startswith("fake cluster up"), "".join(seen)
        got = subprocess.run([sys.executable, str(script), "exec", "--", sys.executable, "-m", "dtrain.launch.cli",
                              "launch", "--ray", "--address", "auto", "--nodes", "2", "--nproc", "1",
                              "--no-progress", *TRAIN], capture_output=True, text=True, timeout=240, cwd=REPO)
        assert _sha(got) == _sha(ref)
        hosts = dict(re.findall(r"dtrain: node (\d) on (10\.231\.\d+\.\d+) \(Ray node", got.stderr))
        assert sorted(hosts) == ["0", "1"] and len(set(hosts.values())) == 2, got.stderr
    finally:
        subprocess.run([sys.executable, str(script), "down"], capture_output=True, timeout=90)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
    assert not Path("/tmp/dtrain-fake-cluster/state.json").exists()


def test_snapshot_process_is_a_ray_actor_and_a_killed_rank_resumes_from_it(cluster: RayCluster, tmp_path: Path) -> None:
    """Under --ray each node's snapshot process is a Ray actor on that node (started by the driver on
    the node leader's request); a SIGKILL'd rank resumes from the in-memory snapshot, bit-exact."""
    snap = ["--set", "zero.stage=3", "--set", "snapshot.enabled=true", "--set", "comm.timeout_s=20"]
    ref = _local("--nodes", "2", "--nproc", "1", "--no-progress", *TRAIN, *snap)
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(f"""
        import runpy, sys
        import dtrain.plugins.snapshot as sp
        from dtrain.snapshot.client import daemon_pid
        restore = sp.SnapshotPlugin.restore
        def reporting(self):
            out = restore(self)
            if self.is_node_leader:
                pid = daemon_pid(self.dir)
                cmd = open(f"/proc/{{pid}}/cmdline").read().replace("\\0", " ")
                print("SNAPHOST", self.node, pid, cmd, flush=True)
            return out
        sp.SnapshotPlugin.restore = reporting
        sys.argv = [{EXAMPLE!r}] + sys.argv[1:]
        runpy.run_path({EXAMPLE!r}, run_name="__main__")
    """))
    metrics = tmp_path / "m.jsonl"
    got = cluster.dtrain("launch", "--ray", "--address", cluster.address, "--nodes", "2", "--nproc", "1",
                         "--no-progress", "--max-restarts", "1", "--inject", "kill:rank=1,step=4", str(script),
                         *TRAIN[1:], *snap, "--metrics", str(metrics))
    assert _sha(got) == _sha(ref)
    hosts = re.findall(r"SNAPHOST (\d) (\d+) (.*)", got.stdout)
    assert {n for n, _, _ in hosts} == {"0", "1"}, got.stdout + got.stderr[-2000:]
    assert all("SnapshotHost" in cmd for _, _, cmd in hosts), hosts  # Ray names its worker process
    assert len({(n, pid) for n, pid, _ in hosts}) == 2, hosts  # the same actors serve the restart
    events = [json.loads(x) for x in metrics.read_text().splitlines() if '"restart"' in x]
    assert events and "local snapshot" in events[-1]["source"] and events[-1]["resumed_from_step"] >= 1, events
