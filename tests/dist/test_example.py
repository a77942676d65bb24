"""The main job end to end: `dtrain launch examples/train_gpt.py` under both launchers.

Checks the metrics contract (docs/metrics.md), that the same seed gives the same param_sha256 run after
run and under torchrun, and that a run preempted after a periodic checkpoint resumes bit-exactly.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.harness import free_port

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "train_gpt.py")
ARGS = ["--model", "tiny", "--steps", "6", "--batch-size", "8"]


def _launch(tmp_path, name, launcher, extra=()):
    metrics = tmp_path / f"{name}.jsonl"
    cmd = {"dtrain": [sys.executable, "-m", "dtrain.launch.cli", "launch", "--nproc", "2", "--no-progress"],
           "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(free_port())]}[launcher]
    # Own session, so a timeout kills the launcher *and* its ranks (no orphans left behind).
    proc = subprocess.Popen([*cmd, EXAMPLE, *ARGS, "--metrics", str(metrics), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        proc.stdout, proc.stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    return lines, proc


def test_metrics_contract_determinism_and_torchrun(tmp_path):
    lines, proc = _launch(tmp_path, "a", "dtrain", ["--set", "zero.stage=3"])
    assert "[rank 0]" in proc.stdout + proc.stderr
    header, steps, summary = lines[0], lines[1:-1], lines[-1]
    assert header["event"] == "run" and header["run_id"].startswith("dtrain-") and header["world_size"] == 2
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert {"step", "loss", "step_time_s", "tokens_per_s", "peak_rss_bytes", "state_bytes",
                "comm_bytes", "restarts", "plugins"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 50e6
        assert set(r["state_bytes"]) == {"params", "grads", "optim"}
        assert r["comm_bytes"]["node"] > 0
    assert summary["summary"] is True and summary["steps"] == 6 and len(summary["param_sha256"]) == 64
    again, _ = _launch(tmp_path, "b", "dtrain", ["--set", "zero.stage=3"])
    assert again[-1]["param_sha256"] == summary["param_sha256"]
    torchrun, _ = _launch(tmp_path, "c", "torchrun", ["--set", "zero.stage=3"])
    assert torchrun[-1]["param_sha256"] == summary["param_sha256"]


def test_preempted_run_resumes_bit_exact(tmp_path):
    straight, _ = _launch(tmp_path, "straight", "dtrain", ["--set", "zero.stage=2"])
    ckpt = ["--set", "zero.stage=2", "--set", f'checkpoint.dir="{tmp_path / "ckpt"}"', "--set", "checkpoint.every=2"]
    first, _ = _launch(tmp_path, "first", "dtrain", [*ckpt, "--stop-at", "4"])
    assert first[-2]["step"] == 4
    resumed, proc = _launch(tmp_path, "resumed", "dtrain", ckpt)
    assert "resumed at step 4 from checkpoint" in proc.stdout + proc.stderr
    assert [r["step"] for r in resumed[1:-1]] == [5, 6]
    assert resumed[-1]["param_sha256"] == straight[-1]["param_sha256"]
