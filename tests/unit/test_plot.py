"""`dtrain plot` input handling: run headers, restarts, unknown records, and one-line errors.

The real-run figure is checked in tests/dist/test_deepspeed_plot.py; these tests build metrics
files by hand to reach the edge cases quickly.
"""
import json
import sys

from dtrain.launch.cli import main
from dtrain.plot import read_runs


def _step(step, **extra):
    return {"step": step, "loss": 1.0 / step, "step_time_s": 0.1, "tokens_per_s": 100.0, "peak_rss_bytes": 2**27,
            "state_bytes": {"params": 10, "grads": 10, "optim": 20}, "comm_bytes": {"node": 5}, **extra}


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_runs_split_at_headers_with_events_and_unknown_records(tmp_path, capsys):
    path = _write(tmp_path / "m.jsonl", [
        _step(1), _step(2),                                     # a run without a header: named by the file
        {"event": "run", "run_id": "r2", "config": {}, "git": "abc"},
        _step(1, new_key=3), _step(2), _step(3),
        {"event": "fault", "kind": "kill", "rank": 1, "node": 0, "step": 3},
        {"event": "restart", "attempt": 1, "resumed_from_step": 2},
        {"event": "something-new", "step": 9}, {"other": "record"}, [1, 2],
        _step(3), _step(4), {"summary": True, "steps": 4, "param_sha256": "ff" * 32},
    ], tail='{"step": 5, "lo')                                 # killed mid-write
    first, second = read_runs(path)
    assert first.label == "m.jsonl" and [r["step"] for r in first.steps] == [1, 2]
    assert second.label == "r2" and [r["step"] for r in second.steps] == [1, 2, 3, 3, 4]
    assert (second.faults, second.restarts, second.summary["steps"]) == ([3], [2], 4)
    assert [[r["step"] for r in seg] for seg in second.segments()] == [[1, 2, 3], [3, 4]]
    assert "skipped 1 unreadable line" in capsys.readouterr().err

    out = tmp_path / "out" / "m.png"
    assert main(["plot", str(path), str(path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(4 run(s), 14 steps)" in capsys.readouterr().err


def test_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    empty = _write(tmp_path / "empty.jsonl", [{"event": "run", "run_id": "x"}, {"summary": True}])
    good = _write(tmp_path / "good.jsonl", [_step(1)])
    cases = [
        ([str(tmp_path / "nope.jsonl")], "does not exist"),
        ([str(good), str(empty)], "has no step records"),
    ]
    for args, message in cases:
        assert main(["plot", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["plot", str(good)]) == 2
    assert capsys.readouterr().err.strip() == "error: dtrain plot needs matplotlib: pip install 'dtrain[plot]'"
    assert not (tmp_path / "good.png").exists()
