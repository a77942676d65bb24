"""Where automatic resume looks after a save was interrupted (docs/layouts.md, "Durability"), and
which directories ``save`` refuses to replace; process-free (directories with a ``meta.json``
stand for complete checkpoints)."""
import json
from pathlib import Path

from dtrain.checkpoint import _replaceable
from dtrain.engine import _complete_checkpoints, checkpoints_newest_first


def _ckpt(path: Path, step: int, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "rank0.safetensors").write_bytes(b"x")
    if complete:
        (path / "meta.json").write_text(json.dumps({"step": step}))
    return path


def test_interrupted_save_of_a_directory(tmp_path):
    target = tmp_path / "ckpt"
    _ckpt(tmp_path / "ckpt.tmp-1", 5, complete=False)  # the new one, not complete: never chosen
    assert checkpoints_newest_first(str(target)) == []
    old = _ckpt(tmp_path / "ckpt.old-1", 3)  # crash after moving the old one aside
    assert checkpoints_newest_first(str(target)) == [old]
    new = tmp_path / "ckpt.tmp-1"
    (new / "meta.json").write_text(json.dumps({"step": 5}))  # crash after meta.json, before the rename
    assert checkpoints_newest_first(str(target)) == [new]
    done = _ckpt(target, 5)
    assert checkpoints_newest_first(str(target)) == [done]


def test_interrupted_periodic_save(tmp_path):
    two = _ckpt(tmp_path / "step-000000002", 2)
    _ckpt(tmp_path / "step-000000004.tmp-ab", 4, complete=False)
    assert _complete_checkpoints(tmp_path) == [two]
    four = tmp_path / "step-000000004.tmp-ab"
    (four / "meta.json").write_text(json.dumps({"step": 4}))
    assert checkpoints_newest_first(str(tmp_path)) == [four, two]


def test_save_replaces_only_checkpoints(tmp_path):
    assert _replaceable(tmp_path / "new") is None
    assert _replaceable(_ckpt(tmp_path / "old", 1)) is None
    (tmp_path / "old" / "rank1.json.tmp").write_text("{")  # an old-style save's leftover
    assert _replaceable(tmp_path / "old") is None
    (tmp_path / "old" / "notes.txt").write_text("mine")
    assert "notes.txt" in _replaceable(tmp_path / "old")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in _replaceable(tmp_path / "file")
