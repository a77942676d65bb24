"""The budget's gradient window (docs/offload.md, "Gradient window"): with the steps inside backward
(overlap, no clipping, one micro-batch, batch-mean loss) and a layout that frees stepped
gradients (ZeRO-2/3), ``offload.memory_budget_gb`` counts the gradients as the three largest
units' parts instead of all of them, and backward waits for the stepper while the units reported
and not yet stepped hold more than the largest unit's gradient.

World 1, ZeRO-3, a 9-unit GPT (8 layers of width 128 + the root, 1.6M parameters), NVMe tier, 8 steps:

* a budget between the window's minimum and the minimum with every gradient (below which, with
  room for every gradient, the window is not used) runs, and equals the in-memory run bit for bit
  (``param_sha256`` and every optimizer state byte): the window changes when memory is held,
  never the arithmetic; the measured peak of gradients held at once (``offload_grad_peak_bytes``,
  sampled at every report and before every release) stays within the counted window, which is
  below the full gradients;
* the same with a stepper slowed by 30 ms a unit: without the wait every reported unit's gradient
  would pile up behind it (up to all nine), so the peak would exceed the window; with it, it does
  not, and the bytes are the same;
* the same budget with clipping (every gradient is held until the global norm is known) is the
  one-line budget error naming the minimum, which counts the gradients in full.

World 2 (real gloo), ZeRO-2 and ZeRO-3, the same model and budget rule: each rank's parts are half
the size, the units are reported after their reduce-scatter, and a rank waiting for its stepper
holds its peer in the next collective until it catches up (the stepper needs nothing from the
training thread, so this cannot deadlock); the bytes equal the in-memory run of the same stage and
every rank's peak stays within its window.
"""
import re

import pytest

from tests.dist.harness import run_world

pytestmark = pytest.mark.dist
STEPS = 8


def _model():
    from dtrain.models.gpt import GPT, GPTConfig
    import torch

    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", n_layer=8, n_embd=128, n_head=4))


def _engine(root: str, budget: float | None, clip: float | None = None, tier: bool = True, stage: int = 3):
    import dtrain
    from tests.dist.workloads import optimizer_factory

    cfg: dict = {"zero": {"stage": stage, "bucket_mb": 0.5}, "train": {"clip_grad_norm": clip}}  # ZeRO-2: ~a layer a unit
    if tier:
        cfg["offload"] = {"enabled": True, "optim": "nvme", "dir": root, "io": "threads", "memory_budget_gb": budget}
    return dtrain.wrap(_model(), optimizer=optimizer_factory, config=cfg)


def _run(engine) -> tuple:
    from tests.dist.test_offload import _state_digest
    from tests.dist.workloads import local_batch

    peaks = []
    rank, world = engine.runtime.rank, engine.runtime.world_size
    for step in range(STEPS):
        engine.train_step(local_batch(step, rank, world))
        m = engine.plugins[1].metrics() if len(engine.plugins) > 1 else {}
        peaks.append((m.get("offload_grad_peak_bytes"), m.get("offload_grad_window_bytes")))
    out = (engine.param_sha256(), _state_digest(engine), peaks, engine.layout.state_bytes()["grads"])
    engine.close()
    return out


def _minimum(message: str) -> float:
    return float(re.search(r"needs at least ([0-9.]+) GB", message).group(1))


def _budget_between(root: str, stage: int) -> float:
    """A budget halfway between the minimum with the window and the minimum with every gradient
    (from the one-line errors of a budget far too small, without and with clipping)."""
    import dtrain

    minimum = {}
    for clip in (None, 1.0):
        try:
            _engine(root, 1e-6, clip=clip, stage=stage)
        except dtrain.UsageError as exc:
            minimum[clip] = _minimum(str(exc))
    assert minimum[None] < minimum[1.0], minimum
    return (minimum[None] + minimum[1.0]) / 2


def _world1(root: str) -> dict:
    import time

    import dtrain
    import dtrain.offload.pipeline as pipeline

    out: dict = {"memory": _run(_engine(root, None, tier=False))}
    budget = out["budget"] = _budget_between(root, 3)
    out["window"] = _run(_engine(root, budget))
    real = pipeline.step_subset

    def slow(optimizer, per_group):
        time.sleep(0.03)
        real(optimizer, per_group)
    pipeline.step_subset = slow
    out["slow"] = _run(_engine(root, budget))
    pipeline.step_subset = real
    try:
        _engine(root, budget, clip=1.0)
        out["clip_error"] = "no error"
    except dtrain.UsageError as exc:
        out["clip_error"] = str(exc)
    return out


def _world2(root: str) -> dict:
    out: dict = {}
    for stage in (2, 3):
        out["memory", stage] = _run(_engine(root, None, tier=False, stage=stage))
        out["window", stage] = _run(_engine(root, _budget_between(root, stage), stage=stage))
    return out


def test_gradient_window_at_world_2(tmp_path):
    for rank_out in run_world(_world2, 2, str(tmp_path), timeout_s=300):
        for stage in (2, 3):
            sha, state, _, full_grads = rank_out["memory", stage]
            got_sha, got_state, peaks, _ = rank_out["window", stage]
            assert (got_sha, got_state) == (sha, state), stage
            window = peaks[0][1]
            assert 0 < window < full_grads and all(0 < peak <= w == window for peak, w in peaks), (stage, peaks)


def test_gradient_window_budget(tmp_path):
    out = run_world(_world1, 1, str(tmp_path), timeout_s=300)[0]
    sha, state, _, full_grads = out["memory"]
    for run in ("window", "slow"):
        got_sha, got_state, peaks, _ = out[run]
        assert (got_sha, got_state) == (sha, state), run
        window = peaks[0][1]
        assert 0 < window < full_grads, (window, full_grads)
        assert all(0 < peak <= w == window for peak, w in peaks), (run, peaks)
    msg = out["clip_error"]  # clipping holds every gradient until the norm is known: counted in full
    assert msg.startswith("offload.memory_budget_gb = ") and "\n" not in msg, msg
    assert "(parameters and gradients " in msg and _minimum(msg) > out["budget"], msg
