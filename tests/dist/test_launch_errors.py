"""`dtrain launch` with real ranks: a usage error is one line per job and never restarted; the
failure summary names the rank that failed first, not a peer that only saw the knock-on error."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]


def _dtrain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtrain.launch.cli", "launch", "--no-progress", *args],
                          capture_output=True, text=True, timeout=150, cwd=REPO)


def test_usage_error_is_one_line_and_not_restarted(tmp_path: Path) -> None:
    script = tmp_path / "usage.py"
    script.write_text(textwrap.dedent("""
        import os, dtrain
        print("attempt", os.environ["TORCHELASTIC_RESTART_COUNT"], flush=True)
        raise dtrain.UsageError("--widgets 3 must divide over 2 ranks")
    """))
    proc = _dtrain("--nproc", "2", "--max-restarts", "2", str(script), "--nproc", "2")  # fork server
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.count("--widgets 3 must divide over 2 ranks") == 1, out
    assert "dtrain: error: --widgets 3 must divide over 2 ranks" in proc.stderr.splitlines()
    assert out.count("attempt 0") == 2 and "attempt 1" not in out and "restarting" not in out, out
    assert "Traceback" not in out and "rank-event" not in out, out
    hint = [ln for ln in proc.stderr.splitlines() if ln.startswith("dtrain: hint: --nproc came after the script")]
    assert len(hint) == 1, proc.stderr


def test_first_failing_rank_is_named_not_the_knock_on_one(tmp_path: Path) -> None:
    script = tmp_path / "culprit.py"
    script.write_text(textwrap.dedent("""
        import atexit, time, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        if dist.get_rank() == 1:
            atexit.register(time.sleep, 3)  # runs last: rank 1 is still exiting when rank 0 has left
            atexit.register(dist.destroy_process_group)  # runs first: rank 0's all_reduce fails now
            raise ValueError("rank one broke first")
        t = torch.ones(1)
        dist.all_reduce(t)  # rank 0: the peer is gone, gloo raises (the knock-on error)
        time.sleep(60)
    """))
    # Rank 0 exits first, with the louder error; torch's own report names only rank 0.
    proc = _dtrain("--nproc", "2", "--start-method", "spawn", str(script))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[rank 0] RuntimeError: " in proc.stderr  # gloo says "closed" or "reset", as timing has it
    assert "Connection closed by peer" in proc.stderr or "Connection reset by peer" in proc.stderr
    [head] = [ln for ln in proc.stderr.splitlines() if ln.startswith("dtrain: job failed")]
    assert head.startswith("dtrain: job failed: rank 1 exited with code 1"), proc.stderr
    tail = proc.stderr.split(head, 1)[1]
    assert "[rank 1] ValueError: rank one broke first" in tail, proc.stderr
