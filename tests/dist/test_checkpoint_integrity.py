"""Damaged checkpoints: one clear CheckpointError naming the file and the failed check, and
automatic resume falling back to the previous complete checkpoint.

The fallback run is compared bit-exactly (``param_sha256``) with the uninterrupted run: it resumes
at step 2 at the same world size and layout, so every later step is the same computation.
"""
import json
from pathlib import Path

import pytest

import dtrain
from dtrain.checkpoint import CheckpointError
from tests.dist.harness import run_world
from tests.dist.workloads import local_batch, make_model, optimizer_factory

pytestmark = pytest.mark.dist


def _run(root: str, until: int) -> dict:
    engine = dtrain.wrap(make_model(), optimizer=optimizer_factory,
                         config={"zero": {"stage": 2}, "checkpoint": {"dir": root, "every": 2}})
    start = engine.step
    for s in range(start, until):
        engine.train_step(local_batch(s, engine.runtime.rank, engine.runtime.world_size))
    return {"start": start, "sha": engine.param_sha256()}


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity") / "ckpt"
    result = run_world(_run, 2, str(root), 4)[0]
    assert sorted(p.name for p in root.iterdir()) == ["step-000000002", "step-000000004"]
    return root, result


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_fallback_to_previous_checkpoint_is_exact(run4, tmp_path, capfd):
    root, uninterrupted = run4
    copy = _copy(root, tmp_path / "ckpt")
    shard = copy / "step-000000004" / "rank1.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    resumed = run_world(_run, 2, str(copy), 4)[0]
    assert resumed["start"] == 2
    assert resumed["sha"] == uninterrupted["sha"]
    lines = [l for l in capfd.readouterr().err.splitlines() if "skipping damaged checkpoint" in l]
    assert len(lines) == 1, lines
    assert "rank1.safetensors: size check failed" in lines[0] and "falling back to" in lines[0]


def _load_error(directory: Path) -> str:
    engine = dtrain.wrap(make_model(), optimizer=optimizer_factory, config={"zero": {"stage": 1}})
    with pytest.raises(CheckpointError) as info:
        engine.load(str(directory))
    return str(info.value)


def test_damaged_files_name_the_file_and_check(run4, tmp_path):
    root, _ = run4
    flipped = _copy(root / "step-000000004", tmp_path / "flipped")
    data = bytearray((flipped / "rank0.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "rank0.safetensors").write_bytes(bytes(data))
    assert "rank0.safetensors: CRC-32C check failed" in _load_error(flipped)

    meta = _copy(root / "step-000000004", tmp_path / "meta")
    (meta / "meta.json").write_text((meta / "meta.json").read_text()[:50])
    assert "meta.json: not valid JSON" in _load_error(meta)

    missing = _copy(root / "step-000000004", tmp_path / "missing")
    (missing / "rank1.json").unlink()
    assert "rank1.json is missing" in _load_error(missing)  # checked although world 1 never reads it

    legacy = _copy(root / "step-000000004", tmp_path / "legacy")  # format 1: no recorded sizes
    info = json.loads((legacy / "meta.json").read_text())
    info.pop("files")
    info["format"] = "dtrain-checkpoint/1"
    (legacy / "meta.json").write_text(json.dumps(info))
    (legacy / "extra.safetensors").write_bytes(b"\x10\x00")
    assert "extra.safetensors: not a readable safetensors file" in _load_error(legacy)


def test_all_damaged_is_an_error(run4, tmp_path):
    root, _ = run4
    copy = _copy(root, tmp_path / "ckpt")
    for step in ("step-000000002", "step-000000004"):
        (copy / step / "extra.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="every complete checkpoint under .* is damaged"):
        dtrain.wrap(make_model(), optimizer=optimizer_factory,
                    config={"zero": {"stage": 2}, "checkpoint": {"dir": str(copy), "every": 2}})
