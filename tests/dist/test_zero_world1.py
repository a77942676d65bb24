"""ZeRO at world 1: one rank holds every part of every unit.

ZeRO-3 then keeps the parameters once: a unit's part is the parameters' own buffer, so nothing is
gathered into a second copy (docs/layouts.md, "One holder"). ZeRO-2/3 add autograd's gradients
straight into the master gradient instead of staging each unit's gradient first. Both change where
values live, not the arithmetic, so all four layouts are *bit-identical* to each other (tiny GPT
with a tied embedding and a frozen parameter, AdamW, gradient accumulation 2, global-norm clipping
1.0, 8 steps, fp32). Against the plain PyTorch reference they agree within test_equivalence's
tolerance (atol 2e-5, rtol 1e-4; its docstring gives the reasoning): the engine forms the
micro-batch objective and the clip norm in its own order, measured here as a 6e-6 maximum
parameter difference after 8 steps, with or without clipping, while a lost update moves
parameters by ~lr = 3e-3.

``offload.params = "nvme"`` frees a unit's part between uses, so with it the parameters get their
own buffer back; that run must still equal the in-memory one bit for bit.
"""
import pytest
import torch

from tests.dist.harness import run_world
from tests.dist.workloads import local_batch, make_model, optimizer_factory, reference_train

pytestmark = pytest.mark.dist
STEPS, ACCUM, CLIP = 8, 2, 1.0


def _runs(offload_dir: str) -> dict[str, dict]:
    import dtrain

    out = {}
    variants = {f"zero{stage}": {"zero": {"stage": stage}} for stage in (0, 1, 2, 3)}
    variants["zero3-params-nvme"] = {"zero": {"stage": 3}, "offload": {
        "enabled": True, "optim": "nvme", "params": "nvme", "dir": offload_dir}}
    for name, cfg in variants.items():
        cfg["train"] = {"grad_accum": ACCUM, "clip_grad_norm": CLIP}
        engine = dtrain.wrap(make_model(), optimizer=optimizer_factory, config=cfg)
        losses = [float(engine.train_step(local_batch(s, 0, 1))) for s in range(STEPS)]
        shards = engine.layout.shards("param")
        storages = {piece.tensor.untyped_storage().data_ptr() for shard in shards for piece in shard.pieces}
        shared = all(p.untyped_storage().data_ptr() in storages
                     for p in engine.model.parameters() if p.requires_grad)
        out[name] = {"losses": losses, "sha": engine.param_sha256(), "params": engine.full_parameters(),
                     "shared": shared, "state_bytes": engine.state_bytes()}
        engine.close()
    return out


def test_world1_layouts_are_bit_identical_and_hold_parameters_once(tmp_path):
    runs = run_world(_runs, 1, str(tmp_path), timeout_s=300)[0]
    shas = {name: run["sha"] for name, run in runs.items()}
    assert len(set(shas.values())) == 1, shas
    # ZeRO-3's part is the parameters' own buffer (every layout at world 1 holds them once) ...
    for name in ("zero0", "zero1", "zero2", "zero3"):
        assert runs[name]["shared"], f"{name}: a parameter lives outside the layout's parameter descriptors"
    # ... except under the parameter tier, which frees the part between uses
    assert not runs["zero3-params-nvme"]["shared"]
    ref_losses, ref_params = reference_train(STEPS, grad_accum=ACCUM, clip=CLIP)
    moved = (ref_params["blocks.0.mlp.0.weight"] - reference_train(0)[1]["blocks.0.mlp.0.weight"]).abs().max()
    assert moved > 1e-3  # the runs trained: parameters moved far beyond any rounding
    for n, ref in ref_params.items():
        torch.testing.assert_close(runs["zero3"]["params"][n], ref, atol=2e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    assert runs["zero3"]["losses"] == pytest.approx(ref_losses, rel=1e-5)
