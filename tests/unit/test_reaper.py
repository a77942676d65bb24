"""dtrain.launch.reaper without ranks: after a stop signal a process whose clean-up hangs still ends
(128 + signal) at ``exit_after_s``, its last clean-up runs, and a child that leads its own process
group (as a rank does) is killed with its own child after ``grace_s``."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dtrain.runstate import start_time

HUNG_LAUNCHER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from pathlib import Path
    from dtrain.launch.reaper import Reaper

    out = Path(sys.argv[1])
    rank = subprocess.Popen([sys.executable, "-c",
                             "import subprocess, time; c = subprocess.Popen(['sleep', '60']); "
                             "print(c.pid, flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(rank.stdout.readline())
    out.write_text(f"{rank.pid} {grandchild}")
    reaper = Reaper(grace_s=0.3, exit_after_s=1.0, last_cleanup=lambda: Path(sys.argv[2]).write_text("ran"))
    reaper.on_signal(signal.SIGTERM)
    time.sleep(30)  # a clean-up that never returns
""")


def test_hung_cleanup_still_exits_and_kills_the_rank_group(tmp_path: Path) -> None:
    script = tmp_path / "hung.py"
    script.write_text(HUNG_LAUNCHER)
    pids, cleaned = tmp_path / "pids", tmp_path / "cleaned"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(pids), str(cleaned)], env=env, timeout=20)
    took = time.monotonic() - start
    assert proc.returncode == 143 and took < 15, (proc.returncode, took)
    assert cleaned.read_text() == "ran"
    rank, grandchild = map(int, pids.read_text().split())
    deadline = time.monotonic() + 5
    while (start_time(rank) or start_time(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert start_time(rank) is None and start_time(grandchild) is None


def test_signal_handlers_reinstalled_after_a_library_replaces_them() -> None:
    """ray.init installs a SIGTERM handler that aborts the driver (no clean-up, exit -6); the Ray
    launcher installs dtrain's handlers again through the function signals_raise gives its block."""
    import signal

    from dtrain.launch.local import signals_raise

    before = signal.getsignal(signal.SIGTERM)
    with signals_raise() as reinstall:
        ours = signal.getsignal(signal.SIGTERM)
        assert callable(ours) and ours is not before
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what a library's own handler does to ours
        reinstall()
        assert signal.getsignal(signal.SIGTERM) is ours
    assert signal.getsignal(signal.SIGTERM) is before
