"""DDP and ZeRO-1/2/3 at world 2 and 3 equal single-process training on the same global batch.

Setup: tiny GPT (tied embedding/LM head, one frozen parameter), AdamW with weight decay,
gradient accumulation 2 and global-norm clipping at 1.0, 10 steps, fp32.

Tolerance: the parallel runs sum per-rank gradients in a different order than one process does,
so each gradient differs from the reference by a few ulps (relative ~1e-7). Adam normalises the
update, so a perturbation of relative size e in a gradient moves that step's update by at most
~e * lr for well-conditioned entries; over 10 steps at lr 3e-3 that is far below 1e-6 absolute.
We allow atol 2e-5 / rtol 1e-4 on parameters (values ~0.02-1) and 1e-5 relative on losses: an
order of magnitude above the observed drift, and several orders below what any real bug causes
(a wrong shard, a missing average or a skipped clip moves parameters by ~lr = 3e-3 per step).
At world 2 layouts that accumulate the same way agree *bit for bit*: with two ranks every
reduction sums the same two addends, so all-reduce and reduce-scatter give identical bits. DDP and
ZeRO-1 accumulate micro-batch gradients locally and reduce once; ZeRO-2/3 reduce every micro-batch
into the shard (that is what keeps gradients at 1/N), which adds in another order. So
ddp == zero1 and zero2 == zero3 exactly; across the two pairs only the tolerance holds.
"""
import pytest
import torch

from tests.dist.harness import run_world
from tests.dist.workloads import dtrain_train, reference_train, sgd_two_groups

pytestmark = pytest.mark.dist
STEPS, ACCUM, CLIP = 10, 2, 1.0
LAYOUTS = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


def _all_layouts(steps: int) -> dict[str, dict]:
    cfg = lambda st: {"zero": {"stage": st}, "train": {"grad_accum": ACCUM, "clip_grad_norm": CLIP}}
    return {name: dtrain_train(cfg(stage), steps) for name, stage in LAYOUTS.items()}


@pytest.fixture(scope="module")
def reference():
    return reference_train(STEPS, grad_accum=ACCUM, clip=CLIP)


@pytest.mark.parametrize("world", [2, 3])
def test_layouts_match_single_process(world, reference):
    ref_losses, ref_params = reference
    runs = run_world(_all_layouts, world, STEPS)[0]
    for name, run in runs.items():
        assert run["losses"] == pytest.approx(ref_losses, rel=1e-5), name
        assert run["params"].keys() == ref_params.keys()
        for pname, ref in ref_params.items():
            torch.testing.assert_close(run["params"][pname], ref, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{name} {pname}: {m}")
        frozen = run["params"]["pos_emb.weight"]
        assert torch.equal(frozen, ref_params["pos_emb.weight"]), "frozen parameter changed"
    if world == 2:
        shas = {name: run["sha"] for name, run in runs.items()}
        assert shas["ddp"] == shas["zero1"], shas
        assert shas["zero2"] == shas["zero3"], shas
    # every layout actually trained: the parameters moved well beyond the tolerance
    moved = (runs["zero3"]["params"]["blocks.0.mlp.0.weight"] - reference_train(0)[1]["blocks.0.mlp.0.weight"]).abs().max()
    assert moved > 1e-3


def _sgd_zero23(steps: int) -> dict[str, dict]:
    return {f"zero{st}": dtrain_train({"zero": {"stage": st}}, steps, factory=sgd_two_groups) for st in (2, 3)}


def test_sgd_momentum_with_param_groups_world3():
    """Two param groups survive flattening: each shard gets one optimizer view per group."""
    _, ref_params = reference_train(6, factory=sgd_two_groups)
    runs = run_world(_sgd_zero23, 3, 6)[0]
    for name, run in runs.items():
        for pname, ref in ref_params.items():
            torch.testing.assert_close(run["params"][pname], ref, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{name} {pname}: {m}")
