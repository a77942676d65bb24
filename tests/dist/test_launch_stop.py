"""SIGTERM to `dtrain launch` ends the launcher and every rank (and what the ranks started) within
10 s, whatever the ranks do: rank 0 ignores SIGTERM, rank 1 is blocked in a collective that rank 0
never joins, and each rank has a child process. Both start methods run side by side in one test:
forked ranks, and spawned ones, as root in a ``--net`` job (2 namespaces: the set-up where a
launcher once outlived its ranks by minutes), else plain. The PIDs checked are the ones the ranks printed;
the ``--net`` job's namespaces must be gone too (its owner record, dtrain.netns)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dtrain.runstate import start_time

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 10.0

RANK_SCRIPT = textwrap.dedent("""
    import os, signal, subprocess, time
    import torch.distributed as dist
    dist.init_process_group("gloo")
    child = subprocess.Popen(["sleep", "600"])
    if dist.get_rank() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("PIDS", os.getpid(), child.pid, flush=True)
    if dist.get_rank() == 0:
        while True:
            time.sleep(1)
    dist.barrier()  # rank 0 never joins: blocked in a collective
""")


def _wait_for_pids(proc: subprocess.Popen, ranks: int, deadline: float) -> list[int]:
    pids: list[int] = []
    assert proc.stdout is not None
    while len(pids) < 2 * ranks and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "PIDS" in line:
            pids += [int(p) for p in line.split("PIDS", 1)[1].split()]
    return pids


def test_sigterm_stops_launcher_and_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(RANK_SCRIPT)
    from dtrain import netns, runstate

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    variants = {"forkserver": ["--nproc", "2", "--start-method", "forkserver"]}
    if netns.unavailable_reason() is None:  # spawned ranks in namespaces
        variants["net"] = ["--nodes", "2", "--nproc", "1", "--net", "bw=1gbit"]
    else:
        variants["spawn"] = ["--nproc", "2", "--start-method", "spawn"]
    launchers = {
        name: subprocess.Popen([sys.executable, "-m", "dtrain.launch.cli", "launch", "--no-progress", *args,
                                str(script)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        for name, args in variants.items()
    }
    try:
        pids = {m: _wait_for_pids(p, 2, time.monotonic() + 90) for m, p in launchers.items()}
        for method, found in pids.items():
            assert len(found) == 4, (method, found, launchers[method].stderr.read() if launchers[method].poll() is not None else "")
        time.sleep(0.5)  # rank 1 is in its barrier now
        sent = time.monotonic()
        for proc in launchers.values():
            proc.send_signal(signal.SIGTERM)
        took: dict[str, float] = {}
        while len(took) < len(launchers) and time.monotonic() < sent + STOP_WITHIN_S:
            took.update({n: round(time.monotonic() - sent, 1) for n, p in launchers.items()
                         if n not in took and p.poll() is not None})
            time.sleep(0.05)
        print(f"launchers stopped after SIGTERM (s): {took}")
        assert len(took) == len(launchers), took
        while time.monotonic() < sent + STOP_WITHIN_S and any(start_time(p) for f in pids.values() for p in f):
            time.sleep(0.05)
        alive = {m: [p for p in found if start_time(p) is not None] for m, found in pids.items()}
        assert alive == {name: [] for name in variants}, (alive, took)
        records = [runstate.read_record(p) for p in runstate.state_root().glob("netns-*.json")]
        spawned = launchers.get("net") or launchers["spawn"]
        assert not [r for r in records if r and r.get("pid") == spawned.pid], records
        for method, proc in launchers.items():
            err = proc.stderr.read()
            assert proc.returncode == 128 + signal.SIGTERM, (method, err)
            assert "dtrain: received SIGTERM, stopped all ranks" in err, (method, err)
            assert "Traceback" not in err, (method, err)
    finally:
        for proc in launchers.values():
            if proc.poll() is None:
                proc.kill()
