"""Durable checkpoints: a save that fails on one rank (a real full tmpfs, and a simulated ENOSPC
on rank 1) raises a CheckpointError on every rank within seconds, removes its partial files and
leaves the previous checkpoint at the same path loadable; what a save interrupted between its
renames leaves is found by automatic resume; a resume with other optimizer hyperparameters
follows the new ones with one line, ``checkpoint.strict`` refuses it.

Every comparison is bit-exact (``param_sha256``): the resumes run at the same world size and
layout as the save, so every later step is the same computation as the uninterrupted run's.
"""
import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import dtrain
from dtrain.checkpoint import CheckpointError
from tests.dist.harness import run_world
from tests.dist.workloads import local_batch, make_model

pytestmark = pytest.mark.dist
TIMEOUT_S = 20  # comm.timeout_s: a rank left waiting on a collective would take this long
PROMPT_S = 5  # what "promptly" means here: well below TIMEOUT_S


def _engine(weight_decay: float = 0.1, strict: bool = False, resume: str | None = None, sgd: bool = False):
    cfg = {"zero": {"stage": 1}, "comm": {"timeout_s": TIMEOUT_S},
           "checkpoint": {"strict": strict, "dir": resume}}
    if sgd:
        factory = lambda p: torch.optim.SGD(p, lr=3e-3, momentum=0.9, weight_decay=weight_decay)
    else:
        factory = lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=weight_decay)
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return dtrain.wrap(make_model(), optimizer=factory, config=cfg, scheduler=sched)


def _steps(engine, start: int, n: int) -> None:
    for s in range(start, start + n):
        engine.train_step(local_batch(s, engine.runtime.rank, engine.runtime.world_size))


def _timed_save(engine, target: Path) -> tuple[str | None, float]:
    start = time.monotonic()
    try:
        engine.save(str(target))
    except CheckpointError as exc:
        return str(exc), time.monotonic() - start
    return None, time.monotonic() - start


def _failing_saves(root: str, full_disk: bool) -> dict:
    engine = _engine()
    rank = engine.runtime.rank
    target = Path(root) / "ckpt"
    _steps(engine, 0, 2)
    engine.save(str(target))
    out = {"saved": engine.param_sha256()}
    _steps(engine, 2, 2)
    out["after"] = engine.param_sha256()
    filler = Path(root) / "filler"
    if full_disk:  # leave half a checkpoint of space: the new one cannot fit next to the old
        if rank == 0:
            need = sum(f.stat().st_size for f in target.iterdir())
            with open(filler, "wb") as f:
                f.write(bytes(max(0, shutil.disk_usage(root).free - need // 2)))
        engine.comm.barrier()
        out["disk"] = _timed_save(engine, target)
        if rank == 0:
            filler.unlink()
        engine.comm.barrier()
    import dtrain.checkpoint as checkpoint

    if rank == 1:
        def full(data: bytes, path: Path) -> dict:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write, checkpoint._atomic_write = checkpoint._atomic_write, full
    out["simulated"] = _timed_save(engine, target)
    if rank == 1:
        checkpoint._atomic_write = real_write
    return out


def _failing_saves_then_resumes(root: str, full_disk: bool, copy: str) -> dict:
    """Both phases in one world (one spawn fewer): the failing saves in ``root``, then, on a copy
    of what they left with the checkpoint moved aside as a crash between two renames leaves it,
    the resumes, with this rank's stderr captured (the "other optimizer settings" lines)."""
    import contextlib
    import io

    out = _failing_saves(root, full_disk)
    torch.distributed.barrier()  # every rank's failed save has cleaned up
    if torch.distributed.get_rank() == 0:
        shutil.copytree(root, copy)
        os.rename(Path(copy) / "ckpt", Path(copy) / "ckpt.old-crashed")  # a crash between "old aside" and "new in"
    torch.distributed.barrier()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out["resumes"] = _resumes(copy)
    out["resume_stderr"] = err.getvalue()
    return out


def _resumes(root: str) -> dict:
    target = Path(root) / "ckpt"
    moved = next(Path(root).glob("ckpt.old-*"))  # the crash left only the old checkpoint, moved aside
    auto = _engine(strict=True, resume=str(target))  # same settings: strict does not object
    out = {"auto_step": auto.step, "auto_saved": auto.param_sha256(), "lr": auto.optimizer.param_groups[0]["lr"]}
    _steps(auto, 2, 2)
    out["auto_after"] = auto.param_sha256()
    changed = _engine(weight_decay=0.0)
    changed.load(str(moved))
    out["changed"] = {"weight_decay": changed.optimizer.param_groups[0]["weight_decay"],
                      "lr": changed.optimizer.param_groups[0]["lr"], "sha": changed.param_sha256()}
    try:
        _engine(weight_decay=0.0, strict=True).load(str(moved))
        out["strict"] = None
    except CheckpointError as exc:
        out["strict"] = str(exc)
    other = _engine(sgd=True)
    other.load(str(moved))
    _steps(other, 2, 1)  # fresh SGD state steps
    out["other_step"] = other.step
    return out


def _mount_tmpfs(where: Path) -> str | None:
    """Mount a small tmpfs at ``where``; why not, or None when it is mounted."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip()}"


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    base = tmp_path_factory.mktemp("durable")
    root = base / "disk"
    why_not = _mount_tmpfs(root)
    if why_not:
        root.mkdir(exist_ok=True)
    try:
        results = run_world(_failing_saves_then_resumes, 2, str(root), why_not is None, str(base / "copy"),
                            timeout_s=240)
        left = sorted(p.name for p in root.iterdir())
        meta_step = __import__("json").loads((root / "ckpt" / "meta.json").read_text())["step"]
    finally:
        if why_not is None:
            subprocess.run(["umount", str(root)], check=False)
    return {"results": results, "left": left, "meta_step": meta_step, "copy": base / "copy", "why_not": why_not}


def _check_failure(failed, which: str, failing_rank: str | None) -> None:
    for rank, result in enumerate(failed["results"]):
        error, took = result[which]
        assert error is not None, f"rank {rank}: the {which} save did not raise"
        assert "No space left on device" in error and (failing_rank is None or failing_rank in error), error
        assert "partial files were removed" in error, error
        assert took < PROMPT_S, f"rank {rank} raised after {took:.1f} s (comm.timeout_s = {TIMEOUT_S})"
    assert failed["left"] == ["ckpt"], f"leftovers after failed saves: {failed['left']}"
    assert failed["meta_step"] == 2, "the previous checkpoint was replaced"


def test_full_tmpfs_raises_everywhere_and_keeps_previous(failed):
    if failed["why_not"]:
        pytest.skip(failed["why_not"])
    _check_failure(failed, "disk", None)


def test_failed_rank_raises_everywhere_promptly(failed):
    _check_failure(failed, "simulated", "rank 1")


def test_resume_after_failures_and_changed_hyperparameters(failed):
    got = failed["results"][0]["resumes"]
    saved, after = failed["results"][0]["saved"], failed["results"][0]["after"]
    assert (got["auto_step"], got["auto_saved"], got["auto_after"]) == (2, saved, after)
    assert got["changed"]["weight_decay"] == 0.0
    assert got["changed"]["lr"] == got["lr"], "the restored scheduler's lr was not kept"
    assert got["changed"]["sha"] == saved
    assert got["strict"] and "weight_decay 0.1 -> 0.0" in got["strict"] and "checkpoint.strict" in got["strict"]
    assert got["other_step"] == 3
    lines = [l for l in failed["results"][0]["resume_stderr"].splitlines() if "saved with other optimizer settings" in l]
    assert len(lines) == 2, lines  # the changed weight decay, the other class
    assert "saved with other optimizer settings" not in failed["results"][1]["resume_stderr"]  # rank 0 only
    assert "group 0 weight_decay 0.1 -> 0.0" in lines[0] and "following this run's" in lines[0], lines[0]
    assert "optimizer AdamW -> SGD" in lines[1], lines[1]


def _snapshot_disk_fails(root: str) -> dict:
    from dtrain.plugins.snapshot import SnapshotError

    config = {"snapshot": {"enabled": True, "persist_every": 1, "persist_dir": str(Path(root) / "file" / "sub")},
              "metrics": {"path": str(Path(root) / "metrics.jsonl")}, "comm": {"timeout_s": TIMEOUT_S}}
    engine = dtrain.wrap(make_model(), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), config=config)
    _steps(engine, 0, 3)
    try:
        engine.close()
    except SnapshotError as exc:
        return {"error": str(exc)}
    return {"error": None}


def test_snapshot_disk_tier_failure_reaches_the_rank(tmp_path, capfd):
    (tmp_path / "file").write_text("a file where the disk tier's directory should be")
    results = run_world(_snapshot_disk_fails, 2, str(tmp_path), timeout_s=180)
    assert results[0]["error"] and "does not hold this run's final state" in results[0]["error"], results
    assert results[1]["error"] is None  # rank 1 is not its node's leader: one report per node
    lines = [__import__("json").loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in lines if r.get("event") == "snapshot_persist_error"]
    assert events and events[0]["node"] == 0 and "persisting step" in events[0]["error"], events
    err = capfd.readouterr().err
    assert "dtrain: snapshot disk tier: node 0: persisting step" in err
