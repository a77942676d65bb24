"""The Ray launcher's pure parts: CLI checks, the per-rank environment, placement targets, failure
reports, restart variables. No Ray cluster and no processes (tests/dist/test_ray.py runs those)."""
from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from dtrain.launch import ray_launch
from dtrain.launch.cli import main
from dtrain.launch.env import read_launch_env
from dtrain.launch.local import LaunchSpec, RankLogFollowers, restart_env
from dtrain.launch.ray_agent import RankExit, interface_of
from dtrain.launch.ray_cluster import RayUnavailable, check_address

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "train_gpt.py")


def _job(tmp_path: Path, **kw) -> ray_launch._Job:
    spec = ray_launch.RaySpec(job=LaunchSpec(script=EXAMPLE, script_args=["--steps", "3"], nproc=2, nodes=3,
                                             max_restarts=2, metrics="/m.jsonl"), **kw)
    return ray_launch._Job(spec, RankLogFollowers(io.StringIO(), io.StringIO()), str(tmp_path), io.StringIO())


def _placement(m: int) -> ray_launch._Placement:
    nodes = [ray_launch._Node(k, None, {"ip": f"10.0.0.{k + 1}", "node_id": f"{k:02d}" + "ab" * 27, "ifname": "eth0"})
             for k in range(m)]
    return ray_launch._Placement(pg=None, nodes=nodes)


@pytest.mark.parametrize("argv, message", [
    (["--address", "auto"], "--address only apply with --ray"),
    (["--ray", "--nodes", "2", "--min-nodes", "3"], "--min-nodes must be between 1 and --nodes (2)"),
    (["--ray", "--net", "bw=1gbit"], "--net builds simulated hosts"),
    (["--ray", "--runtime-env", "{nope"], "--runtime-env is neither a JSON object"),
    (["--ray", "--runtime-env", "[1]"], "--runtime-env must be a JSON object"),
    (["--ray", "--node-wait-s", "0"], "--node-wait-s must be a positive"),
    (["--ray", "--cpus-per-rank", "0"], "--cpus-per-rank must be > 0"),
])
def test_cli_rejects_bad_ray_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", *argv, EXAMPLE]) == 2
    assert message in capsys.readouterr().err


def test_rank_envs_follow_placement_and_carry_restart_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    job = _job(tmp_path)
    envs = job._rank_envs(_placement(3), attempt=1, restart=("node 1 (10.0.0.2) lost", 1234.5), port=29999)
    assert sorted(envs) == [0, 1, 2] and sorted(envs[2]) == [4, 5]
    e = envs[2][5]
    assert (e["RANK"], e["LOCAL_RANK"], e["NODE_RANK"], e["GROUP_RANK"]) == ("5", "1", "2", "2")
    assert (e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["GROUP_WORLD_SIZE"]) == ("6", "2", "3")
    assert (e["MASTER_ADDR"], e["MASTER_PORT"]) == ("10.0.0.1", "29999")
    assert e["GLOO_SOCKET_IFNAME"] == "eth0" and e["NCCL_SOCKET_IFNAME"] == "ib0"
    assert (e["DTRAIN_NODES"], e["DTRAIN_NPROC"], e["DTRAIN_METRICS"]) == ("3", "2", "/m.jsonl")
    assert e["TORCHELASTIC_RESTART_COUNT"] == "1" and e["TORCHELASTIC_MAX_RESTARTS"] == "2"
    parsed = read_launch_env(e)
    assert parsed.node_rank == 2 and parsed.local_rank == 1
    assert parsed.restart_cause == "node 1 (10.0.0.2) lost" and parsed.failure_time == 1234.5
    # a shrunk placement (2 of 3 nodes) is a 4-rank world of 2 nodes
    small = job._rank_envs(_placement(2), attempt=2, restart=None, port=1)[1][3]
    assert (small["WORLD_SIZE"], small["DTRAIN_NODES"]) == ("4", "2")
    assert "DTRAIN_RESTART_CAUSE" not in small


def test_first_attempt_has_no_restart_cause() -> None:
    env = restart_env(0, 3, "rank 1 exited with code 1", 5.0)
    assert env == {"TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert read_launch_env(env).restart_cause is None and read_launch_env(env).failure_time is None
    with pytest.raises(ValueError, match="DTRAIN_FAILURE_TIME"):
        read_launch_env({"DTRAIN_FAILURE_TIME": "soon"})


def test_min_nodes_shrinks_only_within_bounds(tmp_path: Path) -> None:
    assert _job(tmp_path)._target(2) == 3  # no --min-nodes: wait for all three
    job = _job(tmp_path, min_nodes=2)
    assert [job._target(n) for n in (5, 3, 2, 1)] == [3, 3, 2, 3]


def test_lost_node_report_names_node_and_ranks(tmp_path: Path) -> None:
    job = _job(tmp_path)
    node = _placement(3).nodes[1]
    failed = {0: RankExit(0, 1, 99.0)}
    f = job._failure([node], failed, {1: 100.0})
    assert f.cause == "node 1 (10.0.0.2) lost" and f.time == 99.0 and f.status == 1
    assert f.report == "dtrain: job failed: node 1 (10.0.0.2, Ray node 01ababab) lost (ranks 2-3 ran there)"
    assert job.lost == ["node 1 (10.0.0.2, Ray node 01ababab)"]
    assert "lost during this job: node 1 (10.0.0.2, Ray node 01ababab)" in job._placement_message(3, [])


def test_rank_failure_report_has_traceback(tmp_path: Path) -> None:
    job = _job(tmp_path)
    err = tmp_path / "rank3.err"
    err.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom\n")
    job.followers.stderr_paths[3] = str(err)
    f = job._failure([], {3: RankExit(3, 1, 7.0), 1: RankExit(1, -15, 8.0)}, {})
    assert f.cause == "rank 3 exited with code 1" and f.time == 7.0 and f.status == 1
    assert f.report.splitlines()[0] == "dtrain: job failed: rank 3 exited with code 1 (also rank 1 was killed by SIGTERM)"
    assert "[rank 3] ValueError: boom" in f.report


def test_placement_message_names_what_is_missing(tmp_path: Path) -> None:
    msg = _job(tmp_path)._placement_message(3, [{"NodeManagerAddress": "10.0.0.1", "NodeID": "abcdef0123"}])
    assert "cannot place 3 node(s) x 2 rank(s): each node needs {CPU: 2}" in msg
    assert "has 1 alive node(s) that fit [10.0.0.1 (abcdef01)]" in msg and "--min-nodes" in msg


def test_script_path_relative_to_working_dir(tmp_path: Path) -> None:
    script = tmp_path / "sub" / "train.py"
    script.parent.mkdir()
    script.write_text("")
    spec = ray_launch.RaySpec(job=LaunchSpec(script=str(script), script_args=["-x"]),
                              runtime_env={"working_dir": str(tmp_path)})
    job = ray_launch._Job(spec, RankLogFollowers(io.StringIO(), io.StringIO()), str(tmp_path), io.StringIO())
    assert job._script_argv() == ["sub/train.py", "-x"]
    job.spec.runtime_env = None
    assert job._script_argv() == [str(script), "-x"]


def test_bundle_resources() -> None:
    spec = ray_launch.RaySpec(job=LaunchSpec(script="s.py", nproc=4), cpus_per_rank=2, gpus_per_rank=1)
    assert spec.bundle == {"CPU": 8, "GPU": 4}
    assert ray_launch.RaySpec(job=LaunchSpec(script="s.py", nproc=2)).bundle == {"CPU": 2}


def test_unreachable_address_and_interface() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(RayUnavailable, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        check_address(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(RayUnavailable, match="HOST:PORT"):
        check_address("somewhere")
    check_address("auto")
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None
