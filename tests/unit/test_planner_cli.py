"""CLI smoke tests through main([...]) and the slow calibration test."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain.planner.cli import main


def test_seqpar_text(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["seqpar", "--dist", "longtail-mix", "--gpus", "16", "--gpus-per-node", "8",
               "--model", "7b", "--batch", "48", "--seed", "1", "--time-limit", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "FlexSP plan" in out and "static SP d=16" in out and "ideal lower bound" in out
    assert "skipped" in out  # small static degrees cannot hold the long sequences
    assert "solve time" in out and "MILP gap" in out


def test_seqpar_json_and_lengths_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "lengths.txt"
    f.write_text("\n".join(str(x) for x in [512, 2048, 30000, 70000, 1024, 4096]) + "\n")
    rc = main(["seqpar", "--lengths", str(f), "--gpus", "8", "--gpus-per-node", "8",
               "--model", "layers=32,hidden=4096,heads=32,vocab=32000", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)
    assert data["plan"]["lengths"] == [512, 2048, 30000, 70000, 1024, 4096]
    assert data["summary"]["flexsp_step_s"] > 0 and "static" in data["summary"]


@pytest.mark.parametrize("argv, needle", [
    (["seqpar", "--dist", "lognormal", "--gpus", "60", "--gpus-per-node", "8"], "whole number of nodes"),
    (["seqpar", "--dist", "lognormal", "--model", "9q"], "unknown model"),
    (["seqpar", "--dist", "lognormal", "--model", "layers=2,hidden=64"], "lacks"),
    (["seqpar", "--dist", "lognormal", "--batch", "0"], "--batch must be positive"),
    (["seqpar", "--dist", "longtail-mix", "--gpus", "2", "--gpus-per-node", "2", "--seed", "0"],
     "does not fit in memory"),
    (["seqpar", "--dist", "nope"], "invalid choice"),
    (["seqpar"], "required"),
])
def test_errors_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and needle in captured.err
    assert "Traceback" not in captured.err


def test_empty_lengths_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("\n")
    assert main(["seqpar", "--lengths", str(f)]) == 2
    assert "empty" in capsys.readouterr().err
    f.write_text("12\nabc\n")
    assert main(["seqpar", "--lengths", str(f)]) == 2
    assert "not an integer" in capsys.readouterr().err


def test_module_entry_point() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "dtrain.planner.cli", "seqpar", "--dist", "uniform", "--gpus", "8",
         "--batch", "16", "--json"], capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    json.loads(res.stdout)  # nothing but JSON on stdout (no solver banner)


def _calibration_within_tolerance(report) -> bool:
    residuals = sorted(abs(r) for r in report.fit_residuals)
    errors = sorted(abs(v["rel_error"]) for v in report.validation)
    return (residuals[len(residuals) // 2] < 0.25 and residuals[-1] < 1.0
            and errors[len(errors) // 2] < 0.5)


@pytest.mark.slow
def test_calibration_fits_its_own_measurements(tmp_path: Path) -> None:
    from dtrain.planner.calibrate import calibrate
    from dtrain.planner.cluster import load_cluster

    out = tmp_path / "local.toml"
    # The fits must reproduce the points they were fitted on. The bounds tolerate a shared,
    # loaded 2-core host (other jobs steal cycles from single measurements), and one retry
    # is allowed for the same reason; a wrong fit (units, FLOP counts, a missing term) is off
    # by far more. The CLI reports the stricter 10% validation target.
    for _attempt in range(2):
        report = calibrate(out, max_degree=2, quick=True)
        spec = load_cluster(out)
        assert spec.num_devices == 2 and 2 in spec.alltoall_GBps
        assert spec.linear_TFLOPS > 0 and spec.attention_TFLOPS > 0
        assert report.seconds < 90
        assert {v["d"] for v in report.validation} == {1, 2}
        assert len(report.fit_residuals) == 3 + 3 + 3  # attention, dense, all-to-all points
        if _calibration_within_tolerance(report):
            break
    else:
        pytest.fail("calibration fit outside tolerance twice:\n" + report.summary())
