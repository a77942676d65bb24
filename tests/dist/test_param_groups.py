"""Resume with optimizer param groups (the usual decay / no-decay split) under every layout.

Matrix: 1 and 2 AdamW param groups with a warmup + cosine LambdaLR, under ddp and ZeRO 1/2/3, saved
at world 2 after 3 steps. Each checkpoint is
- loaded at world 2 under the same layout and continued 3 steps: bit-exact with continuing the
  original run (``param_sha256``; same world, same reduction order);
- loaded at world 3 under the next layout (stage + 1 mod 4, so a cross-layout load too) and
  continued 3 steps: equal within atol 2e-5 / rtol 1e-4, the bound of test_checkpoint.py
  (gradients are then reduced over 3 ranks, so only the summation order differs);
- consolidated and loaded into a plain model with ``strict=True``, equal to the saved parameters.
With two groups at world 2 rank 0 owns no element of the no-decay group in several units: before
the fix its checkpoint lacked that group's ``step`` and the first step after a load crashed.
The model has a 0-dim parameter (a loss scale) in the no-decay group: its Adam moments are 0-dim
tensors that must be stored as element-wise state, not mistaken for scalar state like ``step``.
"""
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn

import dtrain
from dtrain.checkpoint import CheckpointError, _check_scalar_state, _scalar_state
from tests.dist.harness import run_world
from tests.dist.workloads import local_batch, make_model

pytestmark = pytest.mark.dist
FIRST, SECOND, STAGES, GROUPS = 3, 3, (0, 1, 2, 3), (1, 2)


class ScaledGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gpt = make_model()
        self.loss_scale = nn.Parameter(torch.tensor(1.0))  # 0-dim

    def forward(self, input_ids, labels):
        return self.gpt(input_ids=input_ids, labels=labels) * self.loss_scale


def _factory(groups: int):
    def make(params):
        params = list(params)
        if groups == 1:
            return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)
        return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                 lr=3e-3)
    return make


def _warmup_cosine(opt):
    total, warmup = FIRST + SECOND, 2
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * s / total)))


def _engine(stage: int, groups: int):
    return dtrain.wrap(ScaledGPT(), optimizer=_factory(groups), scheduler=_warmup_cosine,
                       config={"zero": {"stage": stage}, "train": {"clip_grad_norm": 1.0}})


def _steps(engine, start: int, n: int) -> None:
    for s in range(start, start + n):
        engine.train_step(local_batch(s, engine.runtime.rank, engine.runtime.world_size))


def _result(engine) -> dict:
    return {"params": engine.full_parameters(), "sha": engine.param_sha256(),
            "lrs": [g["lr"] for g in engine.optimizer.param_groups]}


def _save_all(root: str) -> dict:
    out = {}
    for groups in GROUPS:
        for stage in STAGES:
            engine = _engine(stage, groups)
            _steps(engine, 0, FIRST)
            saved = engine.full_parameters()
            engine.save(f"{root}/g{groups}-z{stage}")
            _steps(engine, FIRST, SECOND)
            out[groups, stage] = {**_result(engine), "saved": saved}
    return out


def _load_all(root: str, stage_shift: int) -> dict:
    out = {}
    for groups in GROUPS:
        for stage in STAGES:
            engine = _engine((stage + stage_shift) % 4, groups)
            engine.load(f"{root}/g{groups}-z{stage}")
            assert engine.step == FIRST
            _steps(engine, FIRST, SECOND)
            out[groups, stage] = _result(engine)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("groups"))
    return root, run_world(_save_all, 2, root)[0]


def test_same_world_resume_bit_exact(saved):
    root, expected = saved
    got = run_world(_load_all, 2, root, 0)[0]
    for key, ref in expected.items():
        assert got[key]["sha"] == ref["sha"], f"{key[0]} group(s), zero stage {key[1]}"
        assert got[key]["lrs"] == ref["lrs"]


def test_new_world_and_layout_resume(saved):
    root, expected = saved
    got = run_world(_load_all, 3, root, 1)[0]
    for key, ref in expected.items():
        assert got[key]["lrs"] == pytest.approx(ref["lrs"])
        for name, value in ref["params"].items():
            torch.testing.assert_close(got[key]["params"][name], value, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{key} {name}: {m}")


def test_consolidate_strict(saved):
    root, expected = saved
    for (groups, stage), ref in expected.items():
        model = ScaledGPT()
        model.load_state_dict(dtrain.consolidate(f"{root}/g{groups}-z{stage}"), strict=True)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), ref["saved"][name]), f"{groups} group(s), stage {stage}: {name}"


def test_checkpoint_missing_a_group_is_refused(saved, tmp_path):
    """A format-1 checkpoint written before the fix (group 1's scalars missing) is refused at load
    with a message saying so, before anything is changed."""
    root, _ = saved
    old = tmp_path / "old"
    shutil.copytree(f"{root}/g2-z1", old)
    meta = json.loads((old / "meta.json").read_text())
    meta["format"] = "dtrain-checkpoint/1"
    meta["optimizer"]["scalar_state"][1] = {}
    (old / "meta.json").write_text(json.dumps(meta))
    engine = _engine(1, 2)
    before = engine.param_sha256()
    with pytest.raises(CheckpointError, match=r"scalar state \['step'\] for param group\(s\) \[1\].*"
                                              r"dtrain-checkpoint/1.*consolidate"):
        engine.load(str(old))
    assert engine.param_sha256() == before and engine.step == 0


def test_scalar_state_checks():
    _check_scalar_state([{"step": 1}, {"step": 1}], "x")
    _check_scalar_state([{}, {}], "x")  # never stepped
    with pytest.raises(CheckpointError, match=r"group\(s\) \[0\]"):
        _check_scalar_state([{}, {"step": 1}], "x")
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([a, b])
    opt.state[a] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros(2)}
    opt.state[b] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="'step' differs between parameters of param group 0"):
        _scalar_state(opt, {"exp_avg"})
