"""Two jobs on one machine, started at once, do not disturb each other (issue 17, item 1).

Each pair runs the same seeded example (2 ranks), so both must finish with exit status 0, every
step, and the same ``param_sha256`` (bit-exact: same seed, same world, same batches). The two
snapshot jobs each have their own run directory under /dev/shm and their own snapshot processes;
the two ``--net`` jobs each their own namespaces, veths, bridge and subnet (names derived from the
launch's run id), and each removes only its own on exit (its owner record is gone afterwards)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "train_gpt.py")
STEPS = 6


def _start(tmp_path: Path, name: str, launcher: list[str], sets: list[str]) -> tuple[subprocess.Popen, Path]:
    metrics = tmp_path / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "dtrain.launch.cli", "launch", "--no-progress", *launcher, EXAMPLE,
           "--model", "tiny", "--steps", str(STEPS), "--batch-size", "8", "--metrics", str(metrics)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, metrics


def _pair(tmp_path: Path, launcher: list[str], sets: list[str]) -> list[int]:
    jobs = [_start(tmp_path, f"job{i}", launcher, sets) for i in range(2)]
    shas = []
    for proc, metrics in jobs:
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p, _ in jobs:
                p.kill()
            raise AssertionError(f"a job of the pair did not finish:\n{proc.communicate()[0][-3000:]}")
        assert proc.returncode == 0, out[-3000:]
        lines = [json.loads(x) for x in metrics.read_text().splitlines()]
        assert [r["step"] for r in lines if "step" in r and "event" not in r] == list(range(1, STEPS + 1))
        shas.append(next(r for r in lines if r.get("summary"))["param_sha256"])
    assert shas[0] == shas[1]
    return [p.pid for p, _ in jobs]


SNAPSHOT_SETS = ["zero.stage=3", "snapshot.enabled=true"]


def test_two_net_snapshot_jobs_at_once(tmp_path: Path) -> None:
    """Both kinds of isolation in one pair: each job has its own namespaces and bridge, and its own
    snapshot run directory and snapshot processes (which talk over the namespaces' links)."""
    from dtrain import netns, runstate

    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason} (test_two_snapshot_jobs_at_once runs instead)")
    pids = _pair(tmp_path, ["--nodes", "2", "--nproc", "1", "--net", "bw=1gbit"], SNAPSHOT_SETS)
    records = [runstate.read_record(p) for p in runstate.state_root().glob("netns-*.json")]
    assert not [r for r in records if r and r.get("pid") in pids], records  # each removed its own


def test_two_snapshot_jobs_at_once(tmp_path: Path) -> None:
    from dtrain import netns

    if netns.unavailable_reason() is None:
        pytest.skip("covered by test_two_net_snapshot_jobs_at_once, whose jobs also take snapshots")
    _pair(tmp_path, ["--nodes", "2", "--nproc", "1"], SNAPSHOT_SETS)
