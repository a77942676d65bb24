"""User-facing launcher errors, checked without process groups.

* A config mistake (bad key, type or value in ``--set``, a broken ``--config`` file) is one line
  ``dtrain: config error: ...`` with exit status 2 within 2 s, before any rank starts (the script
  would leave a marker file) and without importing torch.
* The rank bootstrap turns a ``dtrain.UsageError`` / ``ConfigError`` into one rank-event line and
  exit status 2 (a traceback only with ``DTRAIN_DEBUG=1``), any other failure into its traceback,
  a rank event and exit status 1.
* The launchers take rank events out of the rank's output, name the rank that failed first by
  the event's time (not the loudest, not the lowest rank) and report a usage error as one line.
* Help texts: examples, the collective timeout, every ``--inject`` kind.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain.faults.spec import SYNTAX
from dtrain.launch import bootstrap, ray_launch
from dtrain.launch.cli import _misplaced_launcher_options, build_parser
from dtrain.launch.local import (
    LaunchSpec, RankLogFollowers, first_failure, format_failures, usage_report, with_reported,
)
from dtrain.launch.ray_agent import RankExit

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("args, says", [
    (["--set", "zero.stgae=1"], "unknown key 'zero.stgae' in zero; allowed keys: auto_tokens_per_step, backward_params, bucket_mb"),
    (["--set", "zero.stage=seven"], "zero.stage must be int, got str 'seven'"),
    (["--set", "zero.stage=7"], "zero.stage = 7 is not allowed; expected 0 (ddp), 1, 2 or 3"),
    (["--config", "{bad}"], "is not valid toml"),
    (["--set", "metrics.tensorboard=\"\""], "metrics.tensorboard = '' is not allowed"),
])
def test_config_error_is_one_line_before_any_rank(tmp_path: Path, args: list[str], says: str) -> None:
    ran = tmp_path / "ran"
    script = tmp_path / "train.py"
    script.write_text(f"open({str(ran)!r}, 'w').close()\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[zero]\nstage = \n")
    args = [a.replace("{bad}", str(bad)) for a in args]
    proc, elapsed = _run("-m", "dtrain.launch.cli", "launch", "--nproc", "2", *args, str(script))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("dtrain: config error: ") and says in lines[0], lines[0]
    assert proc.stdout == "" and not ran.exists()
    assert elapsed < 2.0, f"config error took {elapsed:.2f} s"


def test_config_check_imports_no_torch(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    proc, _ = _run("-c", "import sys; from dtrain.launch.cli import main; "
                   f"rc = main(['launch', '--set', 'zero.stage=7', {str(script)!r}]); print(rc, 'torch' in sys.modules)")
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr


def _bootstrap(tmp_path: Path, body: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    import os

    script = tmp_path / "s.py"
    script.write_text(body)
    env = dict(os.environ, DTRAIN_DEBUG="1" if debug else "0")
    return _run("-m", bootstrap.MODULE, str(script), "--x", "1", env=env)[0]


def _events(stderr: str) -> list[dict]:
    return [e for e in map(bootstrap.parse_rank_event, stderr.splitlines()) if e is not None]


def test_bootstrap_usage_and_config_errors_are_one_line(tmp_path: Path) -> None:
    before = time.time()
    proc = _bootstrap(tmp_path, "import sys, dtrain\nassert sys.argv[1:] == ['--x', '1']\n"
                      "raise dtrain.UsageError('--batch 5 does not split over 2 ranks')\n")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    [event] = _events(proc.stderr)
    assert event["status"] == 2 and event["line"] == "dtrain: error: --batch 5 does not split over 2 ranks"
    assert before <= event["failed_at"] <= time.time()
    proc = _bootstrap(tmp_path, "import dtrain\ndtrain.Config.load(None, ['zero.stage=7'])\n")
    assert proc.returncode == 2 and _events(proc.stderr)[0]["line"].startswith("dtrain: config error: zero.stage = 7")
    debug = _bootstrap(tmp_path, "import dtrain\nraise dtrain.UsageError('bad')\n", debug=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and _events(debug.stderr)[0]["line"] == "dtrain: error: bad"


def test_bootstrap_other_failures_keep_their_traceback(tmp_path: Path) -> None:
    proc = _bootstrap(tmp_path, "raise ValueError('boom')\n")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: boom" in proc.stderr
    assert [(e["status"], e["line"]) for e in _events(proc.stderr)] == [(1, None)]
    proc = _bootstrap(tmp_path, "raise SystemExit(3)\n")
    assert proc.returncode == 3 and [e["status"] for e in _events(proc.stderr)] == [3]
    proc = _bootstrap(tmp_path, "print('fine')\n")
    assert proc.returncode == 0 and proc.stdout == "fine\n" and proc.stderr == ""


def test_followers_take_rank_events_out_of_the_output(tmp_path: Path) -> None:
    err_log = tmp_path / "rank1.err"
    event = {"failed_at": 12.5, "status": 2, "line": "dtrain: error: bad"}
    err_log.write_text(f"warning: x\n{bootstrap.RANK_EVENT_PREFIX}{json.dumps(event)}\nlast\n")
    out, err = io.StringIO(), io.StringIO()
    followers = RankLogFollowers(out, err)
    followers.follow(1, None, str(err_log))
    followers.stop_following()
    assert err.getvalue() == "[rank 1] warning: x\n[rank 1] last\n"
    assert followers.events == {1: event}
    followers.follow(1, None, None)  # a new attempt forgets the old events
    assert followers.events == {}


def test_a_rank_event_after_an_unfinished_progress_bar_is_still_an_event() -> None:
    """A rank that fails while drawing its progress bar leaves the bar's line without a newline, so
    its event line starts after the bar's text; it must not reach the user as raw JSON."""
    event = {"failed_at": 3.0, "status": 2, "line": "dtrain: error: bad"}
    line = f"\r  0%|          | 0/2 [00:00<?, ?step/s]{bootstrap.RANK_EVENT_PREFIX}{json.dumps(event)}"
    assert bootstrap.parse_rank_event(line) == event
    assert bootstrap.parse_rank_event("  0%|          | 0/2 [00:00<?, ?step/s]") is None


def test_first_failure_is_by_time_not_loudness_or_rank() -> None:
    # rank 0 only saw the knock-on gloo error: its event is later than rank 1's
    both = {0: RankExit(0, 1, 10.0, alive_at=9.0), 1: RankExit(1, 1, 10.0, alive_at=9.0)}
    events = {0: {"failed_at": 9.31}, 1: {"failed_at": 9.30}}
    assert first_failure(both) == 0  # without events: a tie, the lowest rank
    assert first_failure(both, events) == 1
    # a rank killed by a signal reports nothing: the last time it was seen alive counts
    killed = {0: RankExit(0, 1, 10.0, alive_at=9.0), 2: RankExit(2, -9, 10.0, alive_at=9.0)}
    assert first_failure(killed, {0: {"failed_at": 9.5}}) == 2
    # ranks the launcher tore down (SIGTERM) come last whatever their time
    assert first_failure({0: RankExit(0, -15, 1.0), 3: RankExit(3, 1, 5.0)}) == 3
    # ... unless they had reported a failure before: rank 1 raised first but was slower to exit
    early = {0: RankExit(0, 1, 10.0, alive_at=9.0)}
    reported = {0: {"failed_at": 9.5, "status": 1}, 1: {"failed_at": 9.2, "status": 1}}
    assert first_failure(early, reported) == 0
    merged = with_reported(early, reported)
    assert first_failure(merged, reported) == 1 and merged[1].exitcode == 1
    assert with_reported({1: RankExit(1, -15, 10.0)}, {1: {"failed_at": 9.0, "status": 2}})[1].exitcode == 2
    assert with_reported({}, {1: {"failed_at": 9.0, "status": 0}}) == {}


def test_usage_report_is_one_line_of_the_first_usage_error(tmp_path: Path) -> None:
    failures = {0: RankExit(0, 2, 5.0), 1: RankExit(1, 2, 5.0), 2: RankExit(2, 1, 5.0)}
    events = {0: {"failed_at": 4.2, "line": "dtrain: error: zero"}, 1: {"failed_at": 4.1, "line": "dtrain: error: one"}}
    assert usage_report(failures, events) == "dtrain: error: one"
    assert usage_report({0: RankExit(0, 2, 5.0)}) .startswith("dtrain: rank 0 exited with status 2 (a usage error")
    assert usage_report({0: RankExit(0, 1, 5.0)}, events) is None
    assert format_failures({0: RankExit(0, 1, 5.0), 1: RankExit(1, 1, 5.0)}, events=events).startswith(
        "dtrain: job failed: rank 1 exited with code 1 (also rank 0 exited with code 1)")


def test_ray_failure_uses_rank_events(tmp_path: Path) -> None:
    spec = ray_launch.RaySpec(job=LaunchSpec(script="s.py", nproc=2, max_restarts=2))
    job = ray_launch._Job(spec, RankLogFollowers(io.StringIO(), io.StringIO()), str(tmp_path), io.StringIO())
    job.followers.events.update({0: {"failed_at": 3.0}, 1: {"failed_at": 2.0}})
    f = job._failure([], {0: RankExit(0, 1, 4.0), 1: RankExit(1, 1, 4.0)}, {})
    assert f.cause == "rank 1 exited with code 1" and not f.usage
    job.followers.events[1] = {"failed_at": 2.0, "status": 2, "line": "dtrain: config error: x"}
    f = job._failure([], {0: RankExit(0, 1, 4.0), 1: RankExit(1, 2, 4.0)}, {})
    assert f.usage and f.status == 2 and f.report == "dtrain: config error: x"


def test_help_shows_examples_timeout_and_inject_kinds() -> None:
    parser = build_parser()
    main_help = parser.format_help()
    assert "examples:" in main_help and "dtrain launch --nproc 2 --set zero.stage=3 --metrics" in main_help
    launch = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("launch"))
    text = " ".join(launch.format_help().split())
    assert "--collective-timeout-s T" in text and "comm.timeout_s" in text and "--timeout-s" not in text
    assert "not a job time limit" in text
    assert "Launcher options go before SCRIPT" in text and "examples:" in text
    for kind, syntax in SYNTAX.items():
        assert syntax in text, kind


def test_misplaced_launcher_options_are_found() -> None:
    assert _misplaced_launcher_options(["--lr", "3", "--nproc=2", "--max-restarts", "1"]) == ["--nproc", "--max-restarts"]
    assert _misplaced_launcher_options(["--set", "zero.stage=3", "--metrics", "m.jsonl"]) == []
