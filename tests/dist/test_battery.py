"""Malformed invocations and inputs (issue 17, item 4): each ends within 30 s with exit status != 0
and ONE line on stderr that names the problem, and no Python traceback (DTRAIN_DEBUG unset).

Most cases fail in the launcher before any rank exists, so they run in this process through
``dtrain.launch.cli.main`` (what the console script calls). A few can only fail in the ranks (a
corrupt checkpoint found through ``checkpoint.dir``, a checkpoint that is not there, a declared
level the world does not fit, set by the script's own config): those are real ``dtrain launch`` processes, started all at
once, with worlds of 1 or 2. Rank output (``[rank R] ...``) may add context; the launcher's own
lines must be exactly one. The 30 s bound of these launches is scaled by the load average per
core when the machine is overloaded (several test runs sharing 2 cores start ranks in minutes,
not seconds); a hang still fails after 150 s.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dtrain.launch.cli import main

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 30.0


def _files(tmp: Path) -> dict[str, str]:
    (tmp / "ok.py").write_text("raise SystemExit(0)\n")
    (tmp / "bad.toml").write_text("[zero\nstage = 3\n")
    (tmp / "list.json").write_text("[1, 2]\n")
    (tmp / "ds_bad.json").write_text("{bad\n")
    (tmp / "ds_offload.json").write_text(json.dumps({"zero_optimization": {"stage": 3,
                                                                          "offload_param": {"device": "cpu"}}}))
    (tmp / "ds_stage.json").write_text(json.dumps({"zero_optimization": {"stage": 9}}))
    (tmp / "a_file").write_text("")
    (tmp / "shm").mkdir()
    (tmp / "shm" / f"dtrain-{os.getuid()}").symlink_to(tmp)
    return {"{S}": str(tmp / "ok.py"), "{shm}": str(tmp / "shm")}


LAUNCHER_CASES: dict[str, tuple[list[str], str]] = {
    # name: (argv with {S} = a valid script and files in the temporary directory, text the line must hold)
    "unknown key": (["launch", "--set", "zero.stgae=3", "{S}"], "unknown key 'zero.stgae'"),
    "unknown section": (["launch", "--set", "zer.stage=3", "{S}"], "did you mean 'zero'"),
    "wrong type": (["launch", "--set", "zero.stage=abc", "{S}"], "zero.stage must be int"),
    "value out of range": (["launch", "--set", "zero.stage=7", "{S}"], "zero.stage = 7 is not allowed"),
    "bool": (["launch", "--set", "snapshot.enabled=maybe", "{S}"], "snapshot.enabled must be bool"),
    "negative every": (["launch", "--set", "checkpoint.every=-1", "{S}"], "checkpoint.every = -1"),
    "malformed --set": (["launch", "--set", "zero.stage", "{S}"], "--set 'zero.stage' is malformed"),
    "nproc 0": (["launch", "--nproc", "0", "{S}"], "--nproc must be >= 1"),
    "nproc not a number": (["launch", "--nproc", "two", "{S}"], "invalid int value: 'two'"),
    "negative nodes": (["launch", "--nodes", "-1", "{S}"], "--nodes must be >= 1"),
    "negative restarts": (["launch", "--max-restarts", "-1", "{S}"], "--max-restarts must be >= 0"),
    "zero collective timeout": (["launch", "--collective-timeout-s", "0", "{S}"], "--collective-timeout-s must be"),
    "renamed --timeout-s": (["launch", "--timeout-s", "5", "{S}"], "use --collective-timeout-s 5"),
    "inject rank out of world": (["launch", "--nproc", "2", "--inject", "kill:rank=9,step=3", "{S}"],
                                 "rank 9 does not exist (world size 2)"),
    "inject unknown kind": (["launch", "--inject", "explode:rank=0", "{S}"], "unknown fault kind 'explode'"),
    "inject bad value": (["launch", "--inject", "kill:rank=x,step=1", "{S}"], "rank must be an integer"),
    "inject missing keys": (["launch", "--inject", "kill", "{S}"], "missing rank, step"),
    "net bad rate": (["launch", "--nodes", "2", "--net", "bw=fast", "{S}"], "bandwidth 'fast'"),
    "net without bw": (["launch", "--nodes", "2", "--net", "latency=5ms", "{S}"], "bw=RATE is required"),
    "missing script": (["launch", "missing.py"], "script not found: 'missing.py'"),
    "missing --config": (["launch", "--config", "missing.toml", "{S}"], "--config file not found"),
    "--config syntax": (["launch", "--config", "bad.toml", "{S}"], "is not valid toml"),
    "--config not a table": (["launch", "--config", "list.json", "{S}"], "config must be a table"),
    "missing --deepspeed-config": (["launch", "--deepspeed-config", "nope.json", "{S}"], "'nope.json' does not exist"),
    "--deepspeed-config not JSON": (["launch", "--deepspeed-config", "ds_bad.json", "{S}"], "is not valid JSON"),
    "--deepspeed-config offload": (["launch", "--deepspeed-config", "ds_offload.json", "{S}"], "offload_param: parameter offload"),
    "--deepspeed-config bad stage": (["launch", "--deepspeed-config", "ds_stage.json", "{S}"], "stage"),
    "metrics dir unwritable": (["launch", "--metrics", "/proc/nope/m.jsonl", "{S}"], "cannot be written"),
    "metrics under a file": (["launch", "--metrics", "a_file/m.jsonl", "{S}"], "is not a writable directory"),
    "checkpoint dir unwritable": (["launch", "--set", 'checkpoint.dir="/proc/nope/ck"', "{S}"],
                                  "checkpoint.dir '/proc/nope/ck' cannot be written"),
    "persist dir unwritable": (["launch", "--set", 'snapshot.persist_dir="/proc/nope"', "{S}"],
                               "snapshot.persist_dir '/proc/nope' cannot be written"),
    "level does not fit": (["launch", "--nproc", "2", "--set", "topology.levels.tri=3", "{S}"],
                           "topology.levels.tri = 3 does not fit"),
    "--min-nodes without --ray": (["launch", "--min-nodes", "2", "{S}"], "--min-nodes only apply with --ray"),
    "--ray with --net": (["launch", "--ray", "--net", "bw=1gbit", "{S}"], "--net builds simulated hosts"),
    "bad --runtime-env": (["launch", "--ray", "--runtime-env", "{bad", "{S}"], "--runtime-env is neither"),
    "unknown option": (["launch", "--frobnicate", "{S}"], "unrecognized arguments: --frobnicate"),
    "no script": (["launch"], "required: script"),
    "unknown command": (["frob"], "invalid choice: 'frob'"),
    "bad start method": (["launch", "--start-method", "fork", "{S}"], "invalid choice: 'fork'"),
    "plot a missing file": (["plot", "missing.jsonl", "-o", "x.png"], "'missing.jsonl' does not exist"),
    "shared directory is a symlink": (["ENV:DTRAIN_SHM_DIR={shm}", "launch", "{S}"], "is a symlink"),
    "shared directory cannot be made": (["ENV:DTRAIN_SHM_DIR=/proc/nope", "launch", "{S}"],
                                        "cannot create /proc/nope/dtrain-"),
}


def _one_line(stderr: str) -> list[str]:
    """The launcher's own lines (rank output and the metrics notice are context)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("[rank ", "dtrain: metrics -> "))]


def test_launcher_level_battery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DTRAIN_DEBUG", raising=False)
    subst = _files(tmp_path)
    problems = []
    for name, (argv, expect) in LAUNCHER_CASES.items():
        err = io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stderr(err), monkeypatch.context() as env:
            for item in [a for a in argv if a.startswith("ENV:")]:  # environment of the case
                key, _, value = item[4:].partition("=")
                env.setenv(key, subst.get(value, value))
            status = main([subst.get(a, a) for a in argv if not a.startswith("ENV:")])
        took = time.monotonic() - start
        lines = _one_line(err.getvalue())
        if status == 0 or took > LIMIT_S or len(lines) != 1 or expect not in lines[0] or "Traceback" in err.getvalue():
            problems.append(f"{name}: status {status}, {took:.1f} s, stderr {err.getvalue()!r}")
    assert not problems, "\n".join(problems)
    assert len(LAUNCHER_CASES) >= 25


RANK_SCRIPTS = {
    "load_missing.py": """
        import sys, torch, dtrain
        engine = dtrain.wrap(torch.nn.Linear(4, 2), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        engine.load(sys.argv[1])
    """,
    "levels.py": """
        import torch, dtrain
        dtrain.wrap(torch.nn.Linear(4, 2), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                    config={"topology": {"levels": {"tri": 3}}})
    """,
}


def test_rank_level_battery(tmp_path: Path) -> None:
    for name, text in RANK_SCRIPTS.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    damaged = tmp_path / "ck" / "step-000000002"
    damaged.mkdir(parents=True)
    (damaged / "meta.json").write_text("{garbage")
    example = str(ROOT / "examples" / "train_gpt.py")
    cases = {  # name: (launcher args, extra env, text the line must hold)
        "corrupt checkpoint via checkpoint.dir": (
            ["--nproc", "1", "--set", f'checkpoint.dir="{tmp_path / "ck"}"', example, "--model", "tiny", "--steps", "1"],
            {}, "dtrain: checkpoint error: every complete checkpoint under"),
        "missing checkpoint": (["--nproc", "1", str(tmp_path / "load_missing.py"), str(tmp_path / "nope")], {},
                               "dtrain: checkpoint error: " + str(tmp_path / "nope") + " is not a complete"),
        "script's level does not fit the world": (["--nproc", "2", str(tmp_path / "levels.py")], {},
                                                  "dtrain: config error: topology.levels.tri = 3 does not fit"),
    }
    env = {k: v for k, v in os.environ.items() if k != "DTRAIN_DEBUG"}
    procs = {name: (subprocess.Popen([sys.executable, "-m", "dtrain.launch.cli", "launch", "--no-progress", *args],
                                     cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT), **extra},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.monotonic())
             for name, (args, extra, _) in cases.items()}
    finished: dict[str, float] = {}
    deadline = time.monotonic() + 150
    while len(finished) < len(procs) and time.monotonic() < deadline:
        for name, (proc, start) in procs.items():
            if name not in finished and proc.poll() is not None:
                finished[name] = time.monotonic() - start
        time.sleep(0.1)
    limit = LIMIT_S * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))  # an overloaded CI box
    problems = []
    for name, (proc, _) in procs.items():
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        took = finished.get(name, float("inf"))
        lines = _one_line(err)
        if proc.returncode == 0 or len(lines) != 1 or cases[name][2] not in lines[0] or "Traceback" in err:
            problems.append(f"{name}: status {proc.returncode}, {took:.1f} s, stderr {err[-2000:]!r}")
        elif took > limit:
            problems.append(f"{name}: took {took:.1f} s (limit {limit:.0f} s at load {os.getloadavg()[0]:.1f})")
    assert not problems, "\n".join(problems)
