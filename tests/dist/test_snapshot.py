"""Snapshots and fault injection end to end: `dtrain launch --inject ...` on the example, ZeRO-3.

Every faulty run must finish with the fault-free run's ``param_sha256`` (bit-exact; the example
draws its batches from (seed, step), so a run that restored step s sees the batches the fault-free
run saw). Because restarting from step 0 would also reproduce that hash, each test also checks
the restart event: where the state came from and which step it resumed at.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "train_gpt.py")
STEPS = 12


TIMEOUT_S = 20  # collective timeout: a hung rank is noticed after this; generous for a busy 2-core CI box
# A rank writes its snapshot in the background and keeps SLOTS (3) per rank, so at a failure
# after step S the newest committed snapshot is S-1 normally, at worst S-3 (S in flight, S-1 and
# S-2 still being coded). LAG is that bound.
LAG = 3


def _launch(tmp_path: Path, name: str, nodes: int, nproc: int, *, inject=(), sets=(), restarts: int = 0,
            env: dict[str, str] | None = None, steps: int = STEPS, wait_s: float = 280
            ) -> tuple[int, list[dict], str]:
    metrics = tmp_path / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "dtrain.launch.cli", "launch", "--nodes", str(nodes), "--nproc", str(nproc),
           "--no-progress", "--max-restarts", str(restarts)]
    for spec in inject:
        cmd += ["--inject", spec]
    cmd += [EXAMPLE, "--model", "tiny", "--steps", str(steps), "--batch-size", "12", "--metrics", str(metrics),
            "--set", "zero.stage=3", "--set", "snapshot.enabled=true", "--set", f"comm.timeout_s={TIMEOUT_S}"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{name} timed out:\n{out[-4000:]}")
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    return proc.returncode, lines, out


def _summary(lines: list[dict]) -> dict:
    return next(r for r in lines if r.get("summary"))


def _restarts(lines: list[dict]) -> list[dict]:
    return [r for r in lines if r.get("event") == "restart"]


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    """param_sha256 of the fault-free runs (2 nodes x 2 ranks and 3 nodes x 1 rank)."""
    tmp = tmp_path_factory.mktemp("fault-free")
    out = {"persist": tmp / "persist"}
    for nodes, nproc in [(2, 2), (3, 1)]:
        # the 2x2 run also persists (to disk every 2 steps): test_persisted_snapshot_of_another_world_is_refused
        # points a job of another world at its directory
        sets = ["snapshot.persist_every=2", f'snapshot.persist_dir="{out["persist"]}"'] if nodes == 2 else []
        rc, lines, log = _launch(tmp, f"ok{nodes}x{nproc}", nodes, nproc, sets=sets)
        assert rc == 0, log[-3000:]
        steps = [r for r in lines if "step" in r and "event" not in r]
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        assert all(r["plugins"]["snapshot_step"] == r["step"] for r in steps)  # every step captured
        out[nodes, nproc] = _summary(lines)["param_sha256"]
    return out


def _check_resumed(lines, log, sha, source_has: str, min_step: int = 1):
    assert _summary(lines)["param_sha256"] == sha, log[-3000:]
    assert _summary(lines)["steps"] == STEPS
    events = _restarts(lines)
    assert events, log[-3000:]
    assert source_has in events[-1]["source"], events
    assert events[-1]["resumed_from_step"] >= min_step, events
    return events


# One run, one fault of each kind after the other (each fires once, at increasing steps, and each
# causes one restart), instead of one launch per kind: the same checks per fault, three fewer
# launches. Restart i belongs to fault i (the fault events are checked to be in this order).
SEQUENCE = ["kill:rank=1,step=4", "node-loss:node=1,step=6", "corrupt:rank=2,step=8", "hang:rank=3,step=10"]


@pytest.fixture(scope="module")
def sequence(tmp_path_factory, fault_free):
    rc, lines, log = _launch(tmp_path_factory.mktemp("sequence"), "sequence", 2, 2, inject=SEQUENCE,
                             restarts=len(SEQUENCE))
    assert rc == 0, log[-3000:]
    assert _summary(lines)["param_sha256"] == fault_free[2, 2], log[-3000:]
    assert _summary(lines)["steps"] == STEPS
    events = _restarts(lines)
    assert len(events) == len(SEQUENCE), events
    assert [r["spec"] for r in lines if r.get("event") == "fault"] == SEQUENCE
    return {"events": dict(zip(("kill", "node-loss", "corrupt", "hang"), events)), "log": log}


def _check_event(event: dict, source_has: str, min_step: int) -> None:
    assert source_has in event["source"], event
    assert event["resumed_from_step"] >= min_step, event


def test_killed_rank_resumes_from_local_snapshot(sequence):
    event = sequence["events"]["kill"]
    _check_event(event, "local snapshot", min_step=4 - LAG)
    assert "SIGKILL" in event["cause"] and SEQUENCE[0] in event["cause"]


def test_lost_node_is_rebuilt_from_parity(sequence):
    _check_event(sequence["events"]["node-loss"], "parity rebuild of node(s) [1]", min_step=6 - LAG)


def test_corrupted_shard_is_detected_and_rebuilt(sequence):
    assert "failed its checksum; rebuilding from parity" in sequence["log"]
    _check_event(sequence["events"]["corrupt"], "parity rebuild of node(s) [1]", min_step=8)


def test_hung_rank_times_out_and_restarts(sequence):
    # the peers' collective timeout names the operation
    assert f"did not complete within {TIMEOUT_S} s" in sequence["log"]
    _check_event(sequence["events"]["hang"], "local snapshot", min_step=10 - LAG)


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory, fault_free):
    """3 nodes x 1 rank, k = 2 + m = 1, persisted every 2 steps: first one lost node (rebuilt from
    parity), then two nodes of the group lost at once (more than m: the disk tier). One launch."""
    tmp = tmp_path_factory.mktemp("three-nodes")
    rc, lines, log = _launch(tmp, "node3", 3, 1, restarts=2,
                             inject=["node-loss:node=0,step=4", "node-loss:node=0,step=9", "node-loss:node=1,step=9"],
                             sets=["snapshot.ec_data=2", "snapshot.ec_parity=1", "snapshot.persist_every=2",
                                   f'snapshot.persist_dir="{tmp / "persist"}"'])
    assert rc == 0, log[-3000:]
    assert _summary(lines)["param_sha256"] == fault_free[3, 1], log[-3000:]
    assert _summary(lines)["steps"] == STEPS
    events = _restarts(lines)
    assert len(events) == 2, events
    return lines, events


def test_three_nodes_k2_m1_node_loss(three_nodes):
    lines, events = three_nodes
    _check_event(events[0], "parity rebuild of node(s) [0]", min_step=4 - LAG)
    assert next(r for r in lines if "step" in r)["plugins"]["snapshot_memory_overhead"] == 1.5


def test_two_lost_nodes_in_a_group_fall_back_to_disk(three_nodes):
    _, events = three_nodes
    _check_event(events[1], "disk tier", min_step=6)  # persisted at 2, 4, 6, 8: at worst 8 is not yet on disk
    assert "in-memory" not in events[1]["source"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_five_faults_finishes_bit_exact(tmp_path, fault_free):
    rc, lines, log = _launch(tmp_path, "chaos", 2, 2, inject=["chaos:faults=5,seed=7"], restarts=5, wait_s=560)
    assert rc == 0, log[-3000:]
    faults = [r for r in lines if r.get("event") == "fault"]
    assert len(faults) == 5, faults
    assert len(_restarts(lines)) == 5
    assert _summary(lines)["param_sha256"] == fault_free[2, 2]


def test_persisted_snapshot_of_another_world_is_refused(tmp_path, fault_free):
    sets = ["snapshot.persist_every=2", f'snapshot.persist_dir="{fault_free["persist"]}"']  # world 4's
    rc, lines, log = _launch(tmp_path, "world2", 2, 1, sets=sets, steps=4)
    assert rc != 0
    assert re.search(r"holds step \d+ of a different run", log), log[-3000:]
    assert not [r for r in lines if "step" in r]


def test_shared_memory_too_small_is_a_clear_error_before_training(tmp_path):
    shm = tmp_path / "tiny-shm"
    shm.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(shm)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        rc, lines, log = _launch(tmp_path, "noshm", 2, 2, env={"DTRAIN_SHM_DIR": str(shm)})
    finally:
        subprocess.run(["umount", "-l", str(shm)], capture_output=True)
    assert rc != 0
    assert "shared memory too small for snapshots" in log and "enlarge it" in log
    assert not [r for r in lines if "step" in r]


def test_slow_rank_only_slows_the_run(tmp_path, fault_free):
    rc, lines, log = _launch(tmp_path, "slow", 2, 2, inject=["slow:rank=2,ms=300,step=3"])
    assert rc == 0, log[-3000:]
    assert _summary(lines)["param_sha256"] == fault_free[2, 2] and not _restarts(lines)
    times = {r["step"]: r["step_time_s"] for r in lines if "step_time_s" in r}
    assert min(times[s] for s in range(4, STEPS + 1)) >= 0.3  # every step waits for the slow rank
    assert [r["spec"] for r in lines if r.get("event") == "fault"] == ["slow:rank=2,ms=300,step=3"]


@pytest.mark.slow
def test_shaped_network_between_namespace_hosts(tmp_path, fault_free):
    from dtrain import netns

    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    # Snapshot processes exchange chunks and parity over the namespaces' veth links.
    rc, lines, log = _launch(tmp_path, "net", 2, 2, inject=["net:bw=200mbit", "node-loss:node=1,step=5"],
                             restarts=1)
    assert rc == 0, log[-3000:]
    _check_resumed(lines, log, fault_free[2, 2], "parity rebuild of node(s) [1]", min_step=5 - LAG)


def test_co2_outer_state_survives_a_kill_mid_round(tmp_path):
    co2 = ["zero.stage=1", "co2.enabled=true", "co2.local_steps=3", "co2.outer_momentum=0.5"]
    rc, lines, log = _launch(tmp_path, "co2-ok", 2, 2, sets=co2)
    assert rc == 0, log[-3000:]
    rc, faulty, log = _launch(tmp_path, "co2-kill", 2, 2, sets=co2, inject=["kill:rank=2,step=5"], restarts=1)
    assert rc == 0, log[-3000:]
    _check_resumed(faulty, log, _summary(lines)["param_sha256"], "local snapshot", min_step=5 - LAG)
