"""The metrics file: run header, a new run replaces the file, restarts of the same run append;
TensorBoard scalars (skipped without the ``tensorboard`` extra); the preflight's metrics checks."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from dtrain.config import Config, ConfigError
from dtrain.launch.preflight import check_config_up_front
from dtrain.metrics import MetricsWriter, git_rev, is_step_record, scalars

REPO = Path(__file__).resolve().parents[2]


def _step(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "step_time_s": 0.5, "tokens_per_s": 100.0 * step,
            "peak_rss_bytes": 1000, "state_bytes": {"params": 10, "grads": 10, "optim": 20},
            "comm_bytes": {"node": 5 * step, "global": 0}, "restarts": 0, "plugins": {"outer_rounds": step, "on": True}}


def _run(path: Path, monkeypatch: pytest.MonkeyPatch, run_id: str, attempt: int, steps: list[int],
         rank: int = 0) -> None:
    monkeypatch.setenv("DTRAIN_RUN_ID", run_id)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
    writer = MetricsWriter(str(path), rank, False, None, config=Config.load({"zero": {"stage": 3}}), world_size=2)
    if attempt:
        writer.write({"event": "restart", "attempt": attempt})
    for s in steps:
        writer.write(_step(s))
    writer.close()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_header_replace_and_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "m.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 99, "loss": 0.0}\n')  # an older run's file, without a header
    _run(path, monkeypatch, "run-A", 0, [1, 2])
    head, *rest = _records(path)
    assert head["event"] == "run" and head["run_id"] == "run-A" and head["world_size"] == 2
    assert head["config"]["zero"]["stage"] == 3 and isinstance(head["started"], float)
    assert "git_rev" in head and not is_step_record(head)
    assert [r["step"] for r in rest] == [1, 2]  # the old file's line is gone
    _run(path, monkeypatch, "run-A", 1, [2, 3])  # a restart of run A appends after its header
    assert [r.get("step", r.get("event")) for r in _records(path)] == ["run", 1, 2, "restart", 2, 3]
    _run(path, monkeypatch, "run-A", 2, [], rank=1)  # ranks other than 0 never touch the file
    assert len(_records(path)) == 6
    _run(path, monkeypatch, "run-B", 0, [1])  # a new run replaces it
    assert [(r.get("run_id"), r.get("step")) for r in _records(path)] == [("run-B", None), (None, 1)]
    _run(path, monkeypatch, "run-C", 1, [4])  # a restart whose first attempt never wrote: not B's file
    assert [(r.get("run_id"), r.get("step")) for r in _records(path)][0] == ("run-C", None)


def test_git_rev_of_a_checkout(tmp_path: Path) -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", git_rev(str(REPO)) or ""), git_rev(str(REPO))
    assert git_rev(str(tmp_path)) is None


def test_scalars_flatten_numbers() -> None:
    tags = dict(scalars(_step(2)))
    assert tags["loss"] == 0.5 and tags["state_bytes/optim"] == 20 and tags["comm_bytes/node"] == 10
    assert tags["plugins/outer_rounds"] == 2 and "step" not in tags and "plugins/on" not in tags


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard not installed (pip install 'dtrain[tensorboard]')")
def test_tensorboard_gets_the_step_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = Config.load(None, [f'metrics.tensorboard="{tmp_path / "tb"}"'])
    writer = MetricsWriter(None, 0, False, None, config=config)
    for s in (1, 2, 3):
        writer.write(_step(s))
    writer.write({"event": "restart", "attempt": 1})
    writer.write({"summary": True, "steps": 3, "param_sha256": "x"})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "tokens_per_s", "state_bytes/params", "comm_bytes/node", "plugins/outer_rounds"} <= tags
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert [e.value for e in acc.Scalars("comm_bytes/node")] == [5, 10, 15]


def test_tensorboard_missing_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    config = Config.load(None, [f'metrics.tensorboard="{tmp_path}"'])
    with pytest.raises(ConfigError, match=r"needs TensorBoard: pip install 'dtrain\[tensorboard\]'"):
        MetricsWriter(None, 0, False, None, config=config)
    with pytest.raises(ConfigError, match="needs TensorBoard"):
        check_config_up_front(None, [f'metrics.tensorboard="{tmp_path}"'])


def test_preflight_checks_the_metrics_destination(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        check_config_up_front(None, [], str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not a writable directory"):
        check_config_up_front(None, [f'metrics.path="{blocker / "m.jsonl"}"'])
    assert check_config_up_front(None, ["zero.stage=2"], str(tmp_path / "new" / "m.jsonl")).zero.stage == 2
