"""The offload tier (docs/offload.md): optimizer state on host memory or NVMe, stepped per unit.

One world-2 run (real gloo) trains the tiny GPT for 10 steps with gradient accumulation 2 under
ddp (small buckets, so several units) and ZeRO-3, each with and without global-norm clipping
(clipping takes the deferred path, no clipping steps units inside backward), in memory and with
``offload.optim`` = host and nvme; ZeRO-1 and ZeRO-2 once each (nvme, no clipping). The promise is bit-identity, so the check is exact: equal
``param_sha256`` and equal bytes of every element-wise optimizer state (read back through
``layout.shards("optim.<key>")``, i.e. from the NVMe tier's files). A tier that skipped a unit,
stepped one twice, stepped before clipping or lost a write would change both.

The same run saves a checkpoint of an NVMe ZeRO-3 run at step 5 and checks: reloading it under
the tier and continuing gives the uninterrupted run's bytes; a failed state-file write mid-step
is one OffloadError and the run recovers from the checkpoint; loading it into ddp + host tier
equals loading it into in-memory ddp (a layout reshard). A world-1 run loads the world-2
checkpoint with and without the tier (a world reshard) and compares exactly. Bad input: a budget
smaller than one unit (the message names the minimum), an unwritable ``offload.dir`` (root may
write anywhere chmod forbids, so the test uses a path under /sys) and a file in its place.

``offload.params = "nvme"`` (ZeRO-3, same world): each rank's parameter parts rest in files and
are read for every gather and step. With clipping (deferred steps, optimizer state on NVMe) and
without (steps inside backward), 10 steps with accumulation 2 equal the in-memory run's
``param_sha256`` and optimizer state bytes exactly; between steps no part is resident and
``layout.shards("param")`` says tier ``nvme``; a checkpoint saved by it loads into an in-memory
run, an in-memory checkpoint loads into it, and it loads at world 1, each continuing to the
uninterrupted bytes. A failed parameter write mid-step is one OffloadError; ddp with it and a
budget below its minimum are one-line errors.

The same world-2 run (one spawn: starting a world costs more than these runs) then checks two
things that are not bit-identical in kind:

* **Mixed placement** (``offload.memory_budget_gb`` leaving room for some units' state beside
  the staging pool): some units stay resident, the rest go to NVMe, and the result is still
  bit-identical to the in-memory run (ddp with 14 small buckets, clipping, accumulation 2, 10 steps).
* **``offload.cpu_adam``**: DeepSpeedCPUAdam against torch's AdamW (ZeRO-3, NVMe, against the
  in-memory ZeRO-3 run with clipping above) and Adam
  (ddp, host tier), same hyperparameters (lr 3e-3, weight decay 0.1), 10 steps. Tolerance:
  max |param difference| <= 1e-4. Why: both compute Adam(W) in float32, but DeepSpeed's kernel
  fuses multiply-adds and keeps the bias-correction powers in float32 (built by repeated
  multiplication) where torch uses float64 ``beta ** step``; Adam divides by ``sqrt(v) + eps``,
  so elements with near-zero gradients magnify a rounding difference up to a fraction of one
  update (<= lr = 3e-3). Measured: 8.8e-6 (AdamW), 3.1e-7 (Adam) on this workload, so 1e-4 is
  an 11x margin, while a wrong mode (Adam for AdamW: 5.6e-2), a skipped unit or a wrong
  learning rate (one update, ~3e-3) is 30x or more above it. The test also checks which
  optimizer ran (its class and the ``offload_cpu_adam`` metric), and that a factory returning
  SGD with ``cpu_adam = true`` is one UsageError line.

Snapshots under offload: ``dtrain launch`` of the example (ZeRO-3, world 2, in-memory snapshots),
rank 1 killed after step 4, with ``offload.optim`` = nvme and host: each run restarts from its
local snapshot (whose optimizer state was read through the shard descriptors, i.e. from the NVMe
tier's files) and ends on the fault-free in-memory run's ``param_sha256`` (bit-exact).
"""
import errno
import hashlib
import os
from pathlib import Path

import pytest

from tests.dist.harness import run_world
from tests.dist.test_snapshot import _launch as launch_snapshot_run

pytestmark = pytest.mark.dist
STEPS, SAVE_AT = 10, 5


def _state_digest(engine) -> str:
    from dtrain.checkpoint import _flat

    h = hashlib.sha256()
    for key in ("exp_avg", "exp_avg_sq"):
        for shard in engine.layout.shards(f"optim.{key}"):
            h.update(_flat(shard).tensor().numpy().tobytes())
    return h.hexdigest()


def _config(stage: int, tier: str | None, clip: float | None, root: str, **offload) -> dict:
    cfg = {"zero": {"stage": stage, "bucket_mb": 0.05}, "train": {"grad_accum": 2, "clip_grad_norm": clip}}
    if tier:
        cfg["offload"] = {"enabled": True, "optim": tier, "dir": root, **offload}
    return cfg


def _train(cfg: dict, first: int, last: int, load: str | None = None, save: str | None = None):
    import dtrain
    from tests.dist.workloads import local_batch, make_model, optimizer_factory

    engine = dtrain.wrap(make_model(), optimizer=optimizer_factory, config=cfg)
    if load:
        engine.load(load)
    rank, world = engine.runtime.rank, engine.runtime.world_size
    for step in range(first, last):
        engine.train_step(local_batch(step, rank, world))
        if save and step + 1 == SAVE_AT:
            engine.save(save)
    return engine


def _result(engine) -> tuple[str, str]:
    out = (engine.param_sha256(), _state_digest(engine))
    engine.close()
    return out


def _usage_error(cfg: dict) -> str:
    import dtrain
    from tests.dist.workloads import make_model, optimizer_factory

    try:
        dtrain.wrap(make_model(), optimizer=optimizer_factory, config=cfg)
    except dtrain.UsageError as exc:
        return str(exc)
    return "no error"


def _disk_full(*args):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def _step_error(engine, io) -> str:
    """The error of one step whose writes through ``io`` all fail (the disk filled up mid-run)."""
    from dtrain.offload.pipeline import OffloadError
    from tests.dist.workloads import local_batch

    io.write = _disk_full
    try:
        engine.train_step(local_batch(SAVE_AT, engine.runtime.rank, engine.runtime.world_size))
        return "no error"
    except OffloadError as exc:
        return str(exc)
    finally:
        engine.plugins[1].teardown()


def _world2(root: str) -> dict:
    out: dict = {}
    ckpt = f"{root}/ckpt"
    for stage in (0, 3):
        for clip in (1.0, None):
            for tier in (None, "host", "nvme"):
                save = ckpt if (stage, clip, tier) == (3, 1.0, "nvme") else None
                engine = _train(_config(stage, tier, clip, root), 0, STEPS, save=save)
                if tier:
                    out["metrics", stage, clip, tier] = engine.plugins[1].metrics()
                    out["tiers", stage, clip, tier] = engine.layout.state_bytes_by_tier()
                if (stage, clip, tier) == (3, 1.0, None):
                    z3_clip_masters = _masters(engine)  # the cpu_adam (AdamW) reference
                out[stage, clip, tier] = _result(engine)
    for stage in (1, 2):  # ZeRO-1/2 keep a separate master shard; the tier steps it the same way
        for tier in (None, "nvme"):
            out[stage, None, tier] = _result(_train(_config(stage, tier, None, root), 0, STEPS))
    nvme3 = _config(3, "nvme", 1.0, root)
    failing = _train(nvme3, SAVE_AT, SAVE_AT, load=ckpt)
    out["failed"] = _step_error(failing, failing.plugins[1].store.io)
    out["recovered"] = _result(_train(nvme3, SAVE_AT, STEPS, load=ckpt))
    out["ddp_host_from_z3"] = _result(_train(_config(0, "host", 1.0, root), SAVE_AT, STEPS, load=ckpt))
    out["ddp_mem_from_z3"] = _result(_train(_config(0, None, 1.0, root), SAVE_AT, STEPS, load=ckpt))
    out["budget"] = _usage_error(_config(3, "nvme", None, root, memory_budget_gb=1e-5))
    out["readonly"] = _usage_error(_config(3, "nvme", None, "/sys/dtrain-offload-test"))
    afile = f"{root}/not-a-dir"
    open(afile, "w").close()
    out["file"] = _usage_error(_config(3, "nvme", None, afile))
    out.update(_params_on_nvme(root, ckpt))
    out.update(_placement_cpu_adam(root, z3_clip_masters))
    out["left_behind"] = sorted(n for n in os.listdir(root) if n.startswith("dtrain-offload-"))
    return out


def _params_on_nvme(root: str, ckpt: str) -> dict:
    """``offload.params = "nvme"`` under ZeRO-3: deferred steps (clipping, optimizer state on NVMe,
    saving a checkpoint) and steps inside backward (no clipping, state in memory), loads both
    ways, and the errors."""
    out: dict = {}
    ckpt_p = f"{root}/ckpt-params"
    for clip, optim in ((1.0, "nvme"), (None, "host")):
        engine = _train(_config(3, optim, clip, root, params="nvme"), 0, STEPS, save=ckpt_p if clip else None)
        tier = engine.plugins[1].params
        out["p_tiers", clip] = engine.layout.state_bytes_by_tier()
        out["p_shard_tiers", clip] = sorted({s.tier for k in ("param", "master") for s in engine.layout.shards(k)})
        out["p_resident", clip] = sum(p.tensor.untyped_storage().nbytes() for p in tier.parts.values())
        out["p_metrics", clip] = engine.plugins[1].metrics()
        out["p", clip] = _result(engine)
    out["p_to_memory"] = _result(_train(_config(3, None, 1.0, root), SAVE_AT, STEPS, load=ckpt_p))
    out["memory_to_p"] = _result(_train(_config(3, "nvme", 1.0, root, params="nvme"), SAVE_AT, STEPS, load=ckpt))
    failing = _train(_config(3, "nvme", 1.0, root, params="nvme"), SAVE_AT, SAVE_AT, load=ckpt_p)
    out["p_failed"] = _step_error(failing, failing.plugins[1].params.io)
    out["p_ddp"] = _usage_error(_config(0, "nvme", None, root, params="nvme"))
    out["p_budget"] = _usage_error(_config(3, "nvme", None, root, params="nvme", memory_budget_gb=1e-5))
    return out


def _world1(root: str) -> dict:
    out = {tier: _result(_train(_config(3, tier, 1.0, root), SAVE_AT, STEPS, load=f"{root}/ckpt"))
           for tier in (None, "nvme")}
    out["params"] = _result(_train(_config(3, "nvme", 1.0, root, params="nvme"), SAVE_AT, STEPS,
                                   load=f"{root}/ckpt-params"))
    return out


def test_offload_bit_identical_checkpoints_and_errors(tmp_path):
    """Also mixed per-unit placement and ``offload.cpu_adam`` in the same world (one spawn): the
    cpu_adam half needs DeepSpeed's op (CI does not install DeepSpeed: there the request must be
    a one-line error instead)."""
    root = str(tmp_path)
    results = run_world(_world2, 2, root, timeout_s=400)
    for rank, out in enumerate(results):
        _check_placement_cpu_adam(rank, out)
        for stage in (0, 3):
            for clip in (1.0, None):
                reference = out[stage, clip, None]
                for tier in ("host", "nvme"):
                    assert out[stage, clip, tier] == reference, (rank, stage, clip, tier)
                    tiers = out["tiers", stage, clip, tier]
                    assert tiers[tier]["optim"] > 0 and tiers["device"]["params"] > 0, tiers
                nvme = out["metrics", stage, clip, "nvme"]
                assert nvme["offload_read_bytes"] > 0 and nvme["offload_write_bytes"] > 0, nvme
        for stage in (1, 2):
            assert out[stage, None, "nvme"] == out[stage, None, None], (rank, stage)
        assert "OSError" in out["failed"] and "resume from the last checkpoint" in out["failed"], out["failed"]
        assert out["recovered"] == out[3, 1.0, "nvme"], rank
        assert out["ddp_host_from_z3"] == out["ddp_mem_from_z3"], rank
        assert "needs at least" in out["budget"] and "offload.memory_budget_gb" in out["budget"], out["budget"]
        assert "offload.dir" in out["readonly"] and "cannot hold" in out["readonly"], out["readonly"]
        assert "offload.dir" in out["file"], out["file"]
        assert out["left_behind"] == [], out["left_behind"]
        _check_params_on_nvme(rank, out)
    # ZeRO-3 steps several units inside backward when nothing defers them.
    assert results[0]["metrics", 3, None, "host"]["optim_overlap"] > 0
    resharded = run_world(_world1, 1, root, timeout_s=300)[0]
    assert resharded["nvme"] == resharded[None]
    assert resharded["params"] == resharded[None]  # a params-on-nvme checkpoint at world 1


def _check_params_on_nvme(rank: int, out: dict) -> None:
    for clip in (1.0, None):
        assert out["p", clip] == out[3, clip, None], (rank, clip)  # parameters and optimizer state
        tiers = out["p_tiers", clip]
        assert tiers["nvme"]["params"] > 0, tiers
        assert out["p_shard_tiers", clip] == ["nvme"], out["p_shard_tiers", clip]
        assert out["p_resident", clip] == 0, (rank, clip, out["p_resident", clip])  # between steps: files only
        metrics = out["p_metrics", clip]
        assert metrics["offload_param_read_bytes"] > 0 and metrics["offload_param_write_bytes"] > 0, metrics
    assert out["p_to_memory"] == out[3, 1.0, None], rank
    assert out["memory_to_p"] == out[3, 1.0, None], rank
    assert "OSError" in out["p_failed"] and "resume from the last checkpoint" in out["p_failed"], out["p_failed"]
    assert "zero.stage = 3" in out["p_ddp"] and "\n" not in out["p_ddp"], out["p_ddp"]
    assert "needs at least" in out["p_budget"] and "\n" not in out["p_budget"], out["p_budget"]


def _masters(engine):
    import torch

    return torch.cat([p.flat().clone() for m in engine.layout.shards("master") for p in m.pieces])


def _placement_cpu_adam(root: str, ref_master) -> dict:
    """Mixed placement, then cpu_adam where DeepSpeed imports (decided in the rank, which loads
    the op anyway: importing DeepSpeed in the test process as well would cost seconds)."""
    import torch

    import dtrain
    from tests.dist import workloads

    try:
        import deepspeed  # noqa: F401
        with_deepspeed = True
    except ImportError:
        with_deepspeed = False
    out: dict = {"with_deepspeed": with_deepspeed}
    # ddp with 10 KB buckets (14 units): room for the parameters, gradients, the staging pool and
    # about half the moments.
    small = _config(0, None, 1.0, root)
    small["zero"]["bucket_mb"] = 0.01
    ddp = _train(small, 0, STEPS)
    held = ddp.layout.state_bytes()
    out["mixed_reference"] = _result(ddp)
    budget = (held["params"] + held["grads"] + 0.6 * held["optim"]) / 2**30
    small["offload"] = _config(0, "nvme", 1.0, root, memory_budget_gb=budget)["offload"]
    mixed = _train(small, 0, STEPS)
    out["mixed_tiers"] = sorted(set(mixed.plugins[1].store.tiers().values()))
    out["mixed_by_tier"] = mixed.layout.state_bytes_by_tier()
    out["mixed"] = _result(mixed)
    if not with_deepspeed:  # the request is refused in one line where the op cannot load
        try:
            _train(_config(3, "nvme", 1.0, root, cpu_adam=True), 0, 1)
            out["no_deepspeed"] = "no error"
        except dtrain.UsageError as exc:
            out["no_deepspeed"] = str(exc)
        return out
    fast = _train(_config(3, "nvme", 1.0, root, cpu_adam=True), 0, STEPS)
    out["cpu_adamw_class"] = [c.__name__ for c in type(fast.layout.optimizer).__mro__]
    out["cpu_adamw_metric"] = fast.plugins[1].metrics()["offload_cpu_adam"]
    out["cpu_adamw_diff"] = float((_masters(fast) - ref_master).abs().max())
    fast.close()

    def adam(params):
        return torch.optim.Adam(params, lr=3e-3, weight_decay=0.1)

    def run_adam(cfg):
        import dtrain

        engine = dtrain.wrap(workloads.make_model(), optimizer=adam, config=cfg)
        for step in range(STEPS):
            engine.train_step(workloads.local_batch(step, engine.runtime.rank, engine.runtime.world_size))
        return engine

    torch_adam = run_adam(_config(0, None, None, root))
    ds_adam = run_adam(_config(0, "host", None, root, cpu_adam=True))
    out["cpu_adam_diff"] = float((_masters(ds_adam) - _masters(torch_adam)).abs().max())
    torch_adam.close()
    ds_adam.close()
    cfg = _config(3, "host", None, root, cpu_adam=True)
    try:
        dtrain.wrap(workloads.make_model(), optimizer=workloads.sgd_two_groups, config=cfg)
        out["sgd"] = "no error"
    except dtrain.UsageError as exc:
        out["sgd"] = str(exc)
    return out


def _check_placement_cpu_adam(rank: int, out: dict) -> None:
    assert out["mixed_tiers"] == ["device", "nvme"], (rank, out["mixed_tiers"])
    by_tier = out["mixed_by_tier"]
    assert by_tier["nvme"]["optim"] > 0 and by_tier["device"]["optim"] > 0, by_tier
    assert out["mixed"] == out["mixed_reference"], rank
    if not out["with_deepspeed"]:
        assert "offload.cpu_adam" in out["no_deepspeed"] and "\n" not in out["no_deepspeed"], out
        return
    assert "DeepSpeedCPUAdam" in out["cpu_adamw_class"] and out["cpu_adamw_metric"] == 1.0, out
    assert out["cpu_adamw_diff"] <= 1e-4, (rank, out["cpu_adamw_diff"])
    assert out["cpu_adam_diff"] <= 1e-4, (rank, out["cpu_adam_diff"])
    assert "offload.cpu_adam" in out["sgd"] and "SGD" in out["sgd"] and "\n" not in out["sgd"], out["sgd"]


def _launch(tmp: Path, name: str, inject: list[str], sets: list[str]) -> tuple[int, list[dict], str]:
    """test_snapshot's launcher on one node of 2 ranks (ZeRO-3, snapshots on), 8 steps."""
    return launch_snapshot_run(tmp, name, 1, 2, inject=inject, sets=["comm.timeout_s=30", *sets],
                               restarts=1 if inject else 0, steps=8)


def test_killed_rank_recovers_from_snapshot_under_offload(tmp_path):
    rc, clean, log = _launch(tmp_path, "clean", [], [])
    assert rc == 0, log[-3000:]
    reference = next(r for r in clean if r.get("summary"))["param_sha256"]
    for tier in ("nvme", "host"):
        sets = ["offload.enabled=true", f'offload.optim="{tier}"', f'offload.dir="{tmp_path}"']
        rc, faulty, log = _launch(tmp_path, tier, ["kill:rank=1,step=4"], sets)
        assert rc == 0, log[-3000:]
        assert next(r for r in faulty if r.get("summary"))["param_sha256"] == reference, (tier, log[-3000:])
        events = [r for r in faulty if r.get("event") == "restart"]
        assert events and events[-1]["resumed_from_step"] >= 2 and "snapshot" in events[-1]["source"], events
        steps = [r for r in faulty if "step" in r and "event" not in r]
        assert all("snapshot_step" in r["plugins"] and "optim_overlap" in r["plugins"] for r in steps), steps[-1]


def test_plan_memory_shows_params_on_nvme(capsys):
    """``dtrain plan memory`` moves the parameter parts to ``nvme`` (no world needed)."""
    import json

    from dtrain.planner.cli import main

    offload = ["--set", "offload.enabled=true", "--set", 'offload.params="nvme"', "--set", 'offload.dir="/tmp"']
    assert main(["memory", "--model", "7b", "--set", "zero.stage=3", *offload, "--json"]) == 0
    tiers = json.loads(capsys.readouterr().out)["bytes_per_rank"]
    p = 6738149376 // 64 * 64  # 7b's parameters, as the planner counts them
    assert abs(tiers["nvme"]["params"] - 4 * p / 64) < 64 * 33, tiers
    assert 0 < tiers["device"]["params"] < tiers["nvme"]["params"] / 2, tiers
    assert main(["memory", "--model", "7b", "--set", "zero.stage=2", *offload]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zero.stage = 3" in err, err
