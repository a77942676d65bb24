"""Sharded checkpoints: exact resume at the same world size, resharding 4 -> 2 and 4 -> 3,
loading across ZeRO stages, and consolidation into a plain model.

Tolerance for resharded continuation: after loading at another world size the remaining steps
reduce gradients over a different number of ranks, so sums are ordered differently (ulp-level
drift, see test_equivalence.py for the bound); the same atol 2e-5 / rtol 1e-4 applies. At the
same world size the continuation is promised bit-exact and checked with param_sha256.
"""
import pytest
import torch

import dtrain
from dtrain.checkpoint import CheckpointError
from tests.dist.harness import run_world
from tests.dist.workloads import local_batch, make_model, optimizer_factory

pytestmark = pytest.mark.dist
FIRST, SECOND = 3, 3


def _engine(stage: int, ckpt: str | None = None):
    cfg = {"zero": {"stage": stage}, "train": {"clip_grad_norm": 1.0}}
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return dtrain.wrap(make_model(), optimizer=optimizer_factory, config=cfg, scheduler=sched)


def _steps(engine, start: int, n: int) -> None:
    r, w = engine.runtime.rank, engine.runtime.world_size
    for s in range(start, start + n):
        engine.train_step(local_batch(s, r, w))


def _save_then_continue(stage: int, directory: str):
    engine = _engine(stage)
    _steps(engine, 0, FIRST)
    engine.save(directory)
    _steps(engine, FIRST, SECOND)
    return {"params": engine.full_parameters(), "sha": engine.param_sha256(),
            "lr": engine.optimizer.param_groups[0]["lr"]}


def _load_then_continue(stage: int, directory: str):
    engine = _engine(stage)
    engine.load(directory)
    assert engine.step == FIRST
    _steps(engine, FIRST, SECOND)
    return {"params": engine.full_parameters(), "sha": engine.param_sha256(),
            "lr": engine.optimizer.param_groups[0]["lr"]}


@pytest.fixture(scope="module")
def saved_at_4(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt4"))
    return directory, run_world(_save_then_continue, 4, 3, directory)[0]


@pytest.mark.parametrize("world,stage", [(2, 3), (3, 3), (2, 1)])
def test_reshard_from_4(saved_at_4, world, stage):
    directory, expected = saved_at_4
    got = run_world(_load_then_continue, world, stage, directory)[0]
    assert got["lr"] == expected["lr"], "LR scheduler state was not restored"
    for name, ref in expected["params"].items():
        torch.testing.assert_close(got["params"][name], ref, atol=2e-5, rtol=1e-4)


def test_same_world_resume_is_bit_exact(tmp_path):
    directory = str(tmp_path / "ckpt")
    expected = run_world(_save_then_continue, 2, 2, directory)[0]
    got = run_world(_load_then_continue, 2, 2, directory)[0]
    assert got["sha"] == expected["sha"]


def test_consolidate_loads_into_plain_model(saved_at_4):
    directory, _ = saved_at_4
    state = dtrain.consolidate(directory)
    model = make_model(seed=123)
    model.load_state_dict(state, strict=True)  # tied alias and frozen param present
    assert torch.equal(model.lm_head.weight, model.tok_emb.weight)
    assert all(t.dtype == torch.float32 for t in state.values())


def test_incomplete_and_mismatched_checkpoints(tmp_path, saved_at_4):
    with pytest.raises(CheckpointError, match="no meta.json"):
        dtrain.checkpoint.CheckpointReader(tmp_path)
    directory, _ = saved_at_4
    from dtrain.models import GPT, GPTConfig

    other = GPT(GPTConfig.preset("tiny", n_embd=64))
    other.pos_emb.weight.requires_grad_(False)  # same parameter set, other shapes
    engine = dtrain.wrap(other, optimizer=optimizer_factory)
    with pytest.raises(CheckpointError, match="has shape"):
        engine.load(directory)
