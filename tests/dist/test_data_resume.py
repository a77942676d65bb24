"""Exact resume with ``dtrain.data.loader``: a run killed mid-epoch sees the fault-free run's batches.

``tests/dist/data_resume_run.py`` (tiny GPT with dropout, 30 samples, 3 per rank per step, so 5
steps per epoch) runs 12 steps at world 2 under ``dtrain launch``: once without faults, then with
rank 1 SIGKILLed after step 7 (epoch 1, position 12 of 30), resuming from a snapshot, and the
node lost after step 10, resuming from a periodic checkpoint (two restarts, one launch). Each
step's sample indices per rank (the last record of a step counts: a resumed attempt redoes some
steps) and the final ``param_sha256`` must equal the fault-free run's bit for bit; each restart
event must show a resume from a saved step (not step 0), so the loader really continued from a
restored position.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "tests" / "dist" / "data_resume_run.py")
STEPS, KILL_AFTER, LOSS_AFTER = 12, 7, 10


def _launch(tmp: Path, *launcher_args: str) -> tuple[dict, list[dict]]:
    tmp.mkdir(parents=True)
    metrics = tmp / "metrics.jsonl"
    cmd = [sys.executable, "-m", "dtrain.launch.cli", "launch", "--nproc", "2", "--no-progress",
           "--metrics", str(metrics), "--set", "comm.timeout_s=30", *launcher_args,
           SCRIPT, "--steps", str(STEPS), "--out", str(tmp)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        out, _ = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    steps: dict = {}
    for rank in (0, 1):
        for line in (tmp / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            steps[rank, rec["step"]] = (rec["ids"], rec["position"])  # a redone step overwrites
    return steps, [json.loads(x) for x in metrics.read_text().splitlines()]


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    steps, lines = _launch(tmp_path_factory.mktemp("data") / "ok")
    assert sorted(steps) == [(r, s) for r in (0, 1) for s in range(1, STEPS + 1)]
    assert steps[0, 7][1] == [1, 12]  # killed mid-epoch 1
    return steps, lines[-1]["param_sha256"]


def test_killed_run_resumes_with_the_same_batches(tmp_path, fault_free):
    # One run restores from both kinds of saved state: a kill after step KILL_AFTER resumes from a
    # snapshot; a node loss after step LOSS_AFTER takes the only node's snapshot process with it, so
    # that restart resumes from the periodic checkpoint (every 3 steps).
    sets = ["--set", "snapshot.enabled=true", "--set", f'checkpoint.dir="{tmp_path / "ckpt"}"',
            "--set", "checkpoint.every=3"]
    steps, lines = _launch(tmp_path / "run", "--max-restarts", "2", "--inject", f"kill:rank=1,step={KILL_AFTER}",
                           "--inject", f"node-loss:node=0,step={LOSS_AFTER}", *sets)
    snapshot, checkpoint = [r for r in lines if r.get("event") == "restart"]
    # the kill fires after step KILL_AFTER: its snapshot may already be committed (resume from it) or
    # still in flight (an earlier one); a checkpoint resumes from the last multiple of checkpoint.every
    assert "snapshot" in snapshot["source"] and 3 <= snapshot["resumed_from_step"] <= KILL_AFTER, snapshot
    assert "checkpoint" in checkpoint["source"] and checkpoint["resumed_from_step"] == 9, checkpoint
    assert steps == fault_free[0]
    assert lines[-1]["param_sha256"] == fault_free[1]
