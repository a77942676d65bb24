"""The step slot is a real seam (dtrain/plugins/step.py), at world 2 on real gloo groups.

* ``ForwardOnlyZO``, a step strategy defined here (not in dtrain): a zeroth-order SPSA step
  (two perturbed forwards, no backward, its own parameter update), registered in the ``step``
  slot. With ``needs_grads = False`` the layout allocates no gradient (``state_bytes`` grads 0,
  no ``.grad`` anywhere), the engine still steps the scheduler, counts steps and runs
  ``after_step``, and the result equals the same SPSA steps in one process on the global batch.
  Tolerance: the ranks' mean of per-rank mean losses differs from the global mean by a few ulps
  (~5e-7 absolute at loss ~5.5); divided by 2 * eps = 2e-2 that is ~3e-5 in the projected
  gradient, times lr 1e-3 and |z| < 5 under 1e-6 per step: atol 2e-5 / rtol 1e-4 on parameters
  (a missing or doubled update moves them by ~lr * |g| * |z| ~ 1e-3).
* ``train.clip_grad_norm`` with a strategy that cannot clip is a one-line ConfigError at wrap.
* ``co2.penalty`` as a constant c divides the pseudo-gradient: after one synchronous round with
  tau 1, beta 0, alpha 1 the parameters are x0 - (x0 - x_off) / c (``x_off``: penalty "off",
  i.e. DDP); c = 1.0 gives the bits of "off"; "adaptive" differs.
* ``train.seed``: the same (seed, rank) gives the same torch / python / numpy draws after wrap,
  ranks and seeds differ, and a run resumed from ``checkpoint.dir`` continues with the restored
  RNG state, not the seed's.
"""
from __future__ import annotations

import random
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import dtrain
from dtrain.config import ConfigError
from dtrain.plugins.base import register
from dtrain.plugins.step import StepOutcome, StepStrategy
from tests.dist.harness import run_world
from tests.dist.workloads import local_batch, make_model

pytestmark = pytest.mark.dist
EPS, LR, STEPS, SEED = 1e-2, 1e-3, 4, 3


def perturbation(params: list[torch.Tensor], seed: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 7919 + step)  # the same z on every rank
    return [torch.randn(p.shape, generator=gen) for p in params]


@torch.no_grad()
def spsa_step(params: list[torch.Tensor], z: list[torch.Tensor], mean_loss) -> tuple[float, float]:
    """theta += eps z; L+; theta -= 2 eps z; L-; theta += eps z; theta -= lr (L+ - L-) / (2 eps) z."""
    for p, zi in zip(params, z):
        p.add_(zi, alpha=EPS)
    plus = mean_loss()
    for p, zi in zip(params, z):
        p.sub_(zi, alpha=2 * EPS)
    minus = mean_loss()
    for p, zi in zip(params, z):
        p.add_(zi, alpha=EPS)
    g = (plus - minus) / (2 * EPS)
    for p, zi in zip(params, z):
        p.sub_(zi, alpha=LR * g)
    return plus, minus


@register
class ForwardOnlyZO(StepStrategy):
    """A ZO2-like step: forward only, no gradient buffers, no clipping."""

    name = "zo_test"
    can_clip = False
    needs_grads = False
    active: ClassVar[bool] = False  # switched on inside a rank (this test has no config section)

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return cls.active

    def run(self, micro_batches: list[Any]) -> StepOutcome:
        engine = self.engine
        params = [p for p in engine.model.parameters() if p.requires_grad]
        shares = []

        def mean_loss() -> float:
            losses = engine.step_loss(micro_batches)
            for i, micro in enumerate(micro_batches):
                engine.forward_objective(micro, i, losses)
            share = losses.local_loss()
            shares.append(share)
            total = share.detach().clone().reshape(1)
            engine.comm.all_reduce(total, engine.dp_level)
            return float(total) / engine.comm.size(engine.dp_level)

        z = perturbation(params, engine.config.train.seed, engine.step)
        engine.before_update()
        spsa_step(params, z, mean_loss)
        return StepOutcome(loss=(shares[0] + shares[1]) / 2)


def zo_reference(steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step in range(steps):
        batch = local_batch(step, 0, 1)
        plus, minus = spsa_step(params, perturbation(params, SEED, step), lambda: float(model(**batch)))
        losses.append((plus + minus) / 2)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _zo() -> dict[str, Any]:
    ForwardOnlyZO.active = True
    try:
        with pytest.raises(ConfigError) as info:
            dtrain.wrap(make_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                        config={"train": {"clip_grad_norm": 1.0}})
        clip_error = str(info.value)
        engine = dtrain.wrap(make_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                             config={"train": {"seed": SEED}},
                             scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
        steps_seen = []
        engine.strategy.after_step = steps_seen.append
        rank, world = engine.runtime.rank, engine.runtime.world_size
        losses = [float(engine.train_step(local_batch(s, rank, world))) for s in range(STEPS)]
        return {"clip_error": clip_error, "strategy": type(engine.strategy).__name__, "losses": losses,
                "params": engine.full_parameters(), "grad_bytes": engine.state_bytes()["grads"],
                "grads": [p.grad is not None for p in engine.model.parameters()],
                "step": engine.step, "after_step": steps_seen, "sched": engine.scheduler.last_epoch}
    finally:
        ForwardOnlyZO.active = False


def _co2_penalties() -> dict[str, Any]:
    co2 = {"enabled": True, "local_steps": 1, "outer_momentum": 0.0, "outer_lr": 1.0, "clip": None,
           "overlap": False, "intra_node_sync": False}
    out = {}
    for penalty in ("off", 2.0, 1.0, "adaptive"):
        engine = dtrain.wrap(make_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                             config={"co2": {**co2, "penalty": penalty}})
        engine.train_step(local_batch(0, engine.runtime.rank, engine.runtime.world_size))
        out[str(penalty)] = {"params": engine.full_parameters(), "sha": engine.param_sha256()}
    return out


def _draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def _seeds(directory: str) -> dict[str, Any]:
    def wrap(seed: int, **config):
        return dtrain.wrap(make_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                           config={"train": {"seed": seed}, **config})

    wrap(5)
    first = _draws()
    wrap(5)
    again = _draws()
    wrap(6)
    other = _draws()
    engine = wrap(5)
    engine.train_step(local_batch(0, engine.runtime.rank, engine.runtime.world_size))
    engine.save(directory)
    after_save = _draws()
    wrap(9, checkpoint={"dir": directory})  # resumes: the checkpoint's RNG state replaces seed 9's
    resumed = _draws()
    return {"first": first, "again": again, "other": other, "after_save": after_save, "resumed": resumed}


def _all(directory: str) -> dict[str, Any]:
    return {"zo": _zo(), "co2": _co2_penalties(), "seeds": _seeds(directory)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_world(_all, 2, str(tmp_path_factory.mktemp("ckpt")))


def test_forward_only_strategy_equals_single_process(results):
    ref_losses, ref_params = zo_reference(STEPS)
    zo = results[0]["zo"]
    assert zo["strategy"] == "ForwardOnlyZO"
    assert zo["grad_bytes"] == 0 and not any(zo["grads"]), "the layout allocated gradients"
    assert zo["step"] == STEPS and zo["after_step"] == list(range(1, STEPS + 1)) and zo["sched"] == STEPS
    assert zo["losses"] == pytest.approx(ref_losses, rel=1e-5)
    for name, ref in ref_params.items():
        torch.testing.assert_close(zo["params"][name], ref, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    moved = max((ref - make_model().state_dict()[n]).abs().max().item() for n, ref in ref_params.items())
    assert moved > 1e-4, "the SPSA steps did not move the parameters: the comparison means nothing"


def test_clip_with_a_strategy_that_cannot_clip_is_a_config_error(results):
    message = results[0]["zo"]["clip_error"]
    assert "train.clip_grad_norm" in message and "zo_test" in message and "\n" not in message


def test_co2_constant_penalty_divides_the_pseudo_gradient(results):
    x0 = {n: p.detach() for n, p in make_model().named_parameters()}
    for rank_result in results:
        runs = rank_result["co2"]
        assert runs["1.0"]["sha"] == runs["off"]["sha"], "penalty 1.0 must be the bits of 'off'"
        assert runs["adaptive"]["sha"] != runs["off"]["sha"]
        for name, x in x0.items():
            expected = x - (x - runs["off"]["params"][name]) / 2.0
            torch.testing.assert_close(runs["2.0"]["params"][name], expected, atol=1e-7, rtol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
        moved = (runs["2.0"]["params"]["blocks.0.mlp.0.weight"] - x0["blocks.0.mlp.0.weight"]).abs().max()
        assert moved > 1e-4


def test_train_seed(results):
    r0, r1 = results[0]["seeds"], results[1]["seeds"]
    for r in (r0, r1):
        assert r["first"] == r["again"], "the same (seed, rank) must give the same draws"
        assert r["first"][0] != r["other"][0] and r["first"][1] != r["other"][1]
        assert r["first"][2] != r["other"][2]
        assert r["resumed"] == r["after_save"], "a resumed run must continue from the restored RNG state"
    assert r0["first"] != r1["first"], "ranks must draw different streams"
