"""End-to-end tests of `dtrain launch` with real processes (gloo on 127.0.0.1)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from dtrain.launch import local
from dtrain.launch.cli import main

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]

ALLREDUCE_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "DTRAIN_NODES", "DTRAIN_NPROC", "DTRAIN_METRICS", "DTRAIN_OVERRIDES",
        "DTRAIN_CONFIG", "DTRAIN_PROGRESS", "DTRAIN_TIMEOUT_S", "DTRAIN_INJECT", "OMP_NUM_THREADS",
        "TORCHELASTIC_RESTART_COUNT"]
print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}))
print(f"SUM {t.item():.0f} ARGS {json.dumps(sys.argv[1:])}")
print(f"ERR line from {dist.get_rank()}", file=sys.stderr)
from dtrain.launch.env import read_launch_env
e = read_launch_env()
print(f"LAUNCHENV nodes={e.nodes} nproc={e.nproc_per_node} node={e.node_rank} world={e.world_size}")
dist.destroy_process_group()
"""


def _write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _dtrain(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dtrain.launch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    tmp = tmp_path_factory.mktemp("launch4")
    script = _write(tmp, "allreduce.py", ALLREDUCE_SCRIPT)
    config = _write(tmp, "cfg.json", "{}")
    proc = _dtrain(
        "launch", "--nodes", "2", "--nproc", "2",
        "--set", "zero.stage=2", "--set", "train.grad_accum=2",  # checked up front: real keys
        "--metrics", str(tmp / "metrics.jsonl"), "--config", str(config),
        "--collective-timeout-s", "60", "--inject", "slow:rank=1,ms=2",
        str(script), "--lr", "3", "--nproc", "7",
    )  # fmt: skip
    return proc, tmp


def test_allreduce_output_is_rank_prefixed(four_ranks: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _ = four_ranks
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in range(4):
        assert f"[rank {rank}] SUM 10 ARGS " in proc.stdout
        assert f"[rank {rank}] ERR line from {rank}" in proc.stderr
    rank_lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert all(re.match(r"\[rank [0-3]\] ", ln) for ln in rank_lines), rank_lines
    # the elastic agent's own logging stays quiet
    assert "torch.distributed" not in proc.stderr and "INFO" not in proc.stderr, proc.stderr


def test_script_args_pass_through_untouched(four_ranks: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _ = four_ranks
    assert '[rank 0] SUM 10 ARGS ["--lr", "3", "--nproc", "7"]' in proc.stdout


def test_env_contract(four_ranks: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, tmp = four_ranks
    envs = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\[rank (\d+)\] ENV (.*)", line)
        if m:
            envs[int(m.group(1))] = json.loads(m.group(2))
    assert sorted(envs) == [0, 1, 2, 3]
    for rank, env in envs.items():
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(rank % 2) and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["GROUP_RANK"] == str(rank // 2)
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"]
        assert env["DTRAIN_NODES"] == "2" and env["DTRAIN_NPROC"] == "2"
        assert env["DTRAIN_METRICS"] == str(tmp / "metrics.jsonl")
        assert env["DTRAIN_CONFIG"] == str(tmp / "cfg.json")
        assert json.loads(env["DTRAIN_OVERRIDES"]) == ["zero.stage=2", "train.grad_accum=2"]
        assert json.loads(env["DTRAIN_INJECT"]) == ["slow:rank=1,ms=2"]
        assert env["DTRAIN_PROGRESS"] == "1" and float(env["DTRAIN_TIMEOUT_S"]) == 60.0
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        if "OMP_NUM_THREADS" not in os.environ:
            assert env["OMP_NUM_THREADS"] == "1"
        node = rank // 2
        assert f"[rank {rank}] LAUNCHENV nodes=2 nproc=2 node={node} world=4" in proc.stdout


def test_failing_rank_is_reported(tmp_path: Path) -> None:
    script = _write(
        tmp_path,
        "fail.py",
        """
        import os, sys, time
        if os.environ["RANK"] == "1":
            raise ValueError("rank one exploded")
        time.sleep(30)
        """,
    )
    start = time.monotonic()
    proc = _dtrain("launch", "--nproc", "2", "--no-progress", str(script))
    assert proc.returncode != 0
    assert time.monotonic() - start < 30  # rank 0 was torn down, not waited for
    report = [ln for ln in proc.stderr.splitlines() if ln.startswith("dtrain: job failed")]
    assert len(report) == 1, proc.stderr
    assert "rank 1 exited with code 1" in report[0]
    tail = proc.stderr.split(report[0], 1)[1]
    assert "ValueError: rank one exploded" in tail
    assert "[rank 1] ValueError: rank one exploded" in proc.stderr  # the rank's own prefixed stderr


def test_max_restarts_recovers(tmp_path: Path) -> None:
    script = _write(
        tmp_path,
        "flaky.py",
        """
        import os
        attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
        if os.environ["RANK"] == "1" and attempt == "0":
            raise SystemExit(3)
        print(f"attempt {attempt} progress={os.environ['DTRAIN_PROGRESS']}")
        """,
    )
    failed = _dtrain("launch", "--nproc", "2", str(script))
    assert failed.returncode == 3 and "rank 1 exited with code 3" in failed.stderr
    proc = _dtrain("launch", "--nproc", "2", "--max-restarts", "1", "--no-progress", str(script))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[rank 0] attempt 1 progress=0" in proc.stdout
    assert "[rank 1] attempt 1 progress=0" in proc.stdout


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigint_stops_all_ranks(tmp_path: Path) -> None:
    script = _write(
        tmp_path,
        "sleepy.py",
        """
        import os, signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stubborn rank: needs the SIGKILL escalation
        print(f"ready {os.getpid()}", flush=True)
        time.sleep(300)
        """,
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "dtrain.launch.cli", "launch", "--nproc", "2", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        pids = []
        assert launcher.stdout is not None
        while len(pids) < 2:
            line = launcher.stdout.readline()
            assert line, "launcher exited before the ranks were ready"
            m = re.search(r"\[rank \d\] ready (\d+)", line)
            if m:
                pids.append(int(m.group(1)))
        # every socket the launcher and its ranks listen on is loopback-only
        for proc in [psutil.Process(launcher.pid), *map(psutil.Process, pids)]:
            listening = [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            assert all(addr.ip == "127.0.0.1" for addr in listening), (proc.pid, listening)
            assert listening or proc.pid != launcher.pid  # the launcher hosts the stores
        launcher.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "ranks survived SIGINT to the launcher"
        assert launcher.wait(timeout=15) == 130
        assert "received SIGINT" in launcher.stderr.read()  # type: ignore[union-attr]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


@pytest.mark.parametrize(
    "args, message",
    [
        (["launch", "missing_script.py"], "script not found: 'missing_script.py'"),
        (["launch", "--nproc", "0", "{script}"], "--nproc must be >= 1"),
        (["launch", "--nodes", "0", "{script}"], "--nodes must be >= 1"),
        (["launch", "--set", "lr0.1", "{script}"], "--set 'lr0.1' is malformed; use --set section.key=value"),
        (["launch", "--inject", "meteor:rank=1", "{script}"], "unknown fault kind 'meteor'"),
        (["launch", "--nproc", "two", "{script}"], "invalid int value: 'two'"),
        (["launch"], "the following arguments are required: script"),
    ],
)
def test_bad_cli_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    script = _write(tmp_path, "ok.py", "print('hi')\n")
    code = main([a.replace("{script}", str(script)) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_bad_cli_input_via_console_entry() -> None:
    proc = _dtrain("launch", "--nproc", "0", "nothere.py", timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dtrain ")


def test_plan_forwards_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = type(sys)("dtrain.planner.cli")
    fake.main = lambda argv: seen.append(list(argv)) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dtrain.planner.cli", fake)
    assert main(["plan", "--model", "gpt", "-h"]) == 7
    assert seen == [["--model", "gpt", "-h"]]


def test_plan_missing_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "dtrain.planner.cli", None)
    assert main(["plan", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: `dtrain plan` is not available")


class _FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redrawn_in_place_on_a_tty(tmp_path: Path) -> None:
    """tqdm-style '\\r' updates are drawn in place with the prefix; full lines stay intact."""
    log = tmp_path / "stderr.log"
    log.write_bytes(b"hello\n\r  0%|   | 0/3\r 33%|#  | 1/3\r 67%|## | 2/3")
    out = _FakeTty()
    follower = local._FileFollower(str(log), "[rank 0] ", out, local._Console())
    follower.start()
    time.sleep(0.3)
    with open(log, "ab") as fh:
        fh.write(b"\r100%|###| 3/3\ndone\n")
    follower.finished.set()
    follower.join(5)
    text = out.getvalue()
    assert text.startswith("[rank 0] hello\n")
    assert "\r[rank 0]  67%|## | 2/3" in text
    assert "[rank 0] 100%|###| 3/3\n[rank 0] done\n" in text
    assert "\n[rank 0] \n" not in text  # no empty prefixed lines from the carriage returns


def test_progress_bar_off_tty_is_throttled(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    log.write_bytes(b"".join(b"\r %d%%|bar|" % i for i in range(50)) + b"\r100%|bar|\n")
    out = io.StringIO()
    follower = local._FileFollower(str(log), "[rank 0] ", out, local._Console())
    follower.finished.set()
    follower.start()
    follower.join(5)
    assert out.getvalue().splitlines() == ["[rank 0] 100%|bar|"]
