"""``train.loss_norm = "tokens"``: uneven padding across ranks and micro-batches gives exactly the
gradient of the global-batch token mean (dtrain/loss.py).

Setup: tiny GPT (tied embedding / LM head, one frozen parameter), plain SGD (lr 0.3: unlike Adam,
SGD is not invariant to the scale of the gradient, so a wrong normaliser shows), grad_accum 2,
4 steps, fp32, 12 sequences of 16 tokens per global batch whose labels are padded with -100 by
a different amount per sequence and step (0 to 13 tokens; at step 1 the first three sequences
are entirely padding, so at world 3 a whole micro-batch has no valid token). The reference is one
process computing sum(cross_entropy(reduction="sum")) / N over the global batch in one forward.

Runs: ddp and zero3 at world 2 and 3 (labels counted up front, one all-reduce), and ddp
with a loss_fn returning ``(loss_sum, n_tokens)`` (counts known only after the forward; the
gradients are scaled once all are in).

Tolerance (as tests/dist/test_equivalence.py): the ranks sum per-token losses and gradients in
another order than the reference, so each gradient differs by a few ulps (relative ~1e-7); an SGD
step moves a parameter by lr * g, so after 4 steps the drift is ~1e-7 absolute. We allow atol
2e-5 / rtol 1e-4 on parameters and rel 1e-5 on the returned losses. Any wrong normalisation
(the per-rank or per-micro-batch mean, a missing factor of the group size) changes gradients by
~10 % or more here: ``loss_norm = "batch"`` on the same data must miss the reference by > 1e-3,
which the test asserts so that it can fail.

The Hugging Face check (rule 3: labels shifted inside the model, ``num_items_in_batch``) runs a
tiny GPT-2 built from a config when ``transformers`` is installed, and is skipped otherwise.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.dist.harness import run_world
from tests.dist.workloads import GLOBAL_BATCH, SEQ, global_batch, make_model

pytestmark = pytest.mark.dist
STEPS, ACCUM, LR = 4, 2, 0.3


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


def padded_global(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of the global batch; labels padded with -100 unevenly."""
    x = global_batch(step)
    inputs, labels = x[:, :-1], x[:, 1:].clone()
    for j in range(GLOBAL_BATCH):
        pad = SEQ if (step == 1 and j < 3) else (j * 7 + step * 5) % 14
        if pad:
            labels[j, SEQ - pad:] = -100
    return inputs, labels


def local_part(step: int, rank: int, world: int, key: str = "labels") -> dict[str, torch.Tensor]:
    inputs, labels = padded_global(step)
    return {"input_ids": inputs.chunk(world)[rank], key: labels.chunk(world)[rank]}


class Logits(nn.Module):
    """The GPT returning logits; the loss is left to a loss_fn (its batch has ``targets``, not labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = make_model()

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids)


def sum_and_count(logits: torch.Tensor, batch: dict[str, torch.Tensor]):
    targets = batch["targets"].reshape(-1)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets, reduction="sum"), (targets != -100).sum()


def reference(steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model()
    opt = sgd([p for p in model.parameters() if p.requires_grad])
    losses = []
    for step in range(steps):
        opt.zero_grad()
        inputs, labels = padded_global(step)
        logits = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), reduction="sum")
        loss = loss / (labels != -100).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(config: dict, model_fn=make_model, loss_fn=None, key: str = "labels") -> dict:
    import dtrain

    engine = dtrain.wrap(model_fn(), optimizer=sgd, config=config, loss_fn=loss_fn)
    rank, world = engine.runtime.rank, engine.runtime.world_size
    losses = [float(engine.train_step(local_part(s, rank, world, key))) for s in range(STEPS)]
    params = {n.removeprefix("gpt."): p for n, p in engine.full_parameters().items()}
    return {"losses": losses, "params": params if rank == 0 else None}


def _runs() -> dict[str, dict]:
    tokens = lambda stage: {"zero": {"stage": stage}, "train": {"grad_accum": ACCUM, "loss_norm": "tokens"}}
    out = {name: _train(tokens(stage)) for name, stage in (("ddp", 0), ("zero3", 3))}
    out["ddp-loss_fn-(sum,n)"] = _train(tokens(0), model_fn=Logits, loss_fn=sum_and_count, key="targets")
    out["batch-mode"] = _train({"train": {"grad_accum": ACCUM, "loss_norm": "batch"}})
    return out


@pytest.fixture(scope="module")
def ref():
    return reference(STEPS)


@pytest.mark.parametrize("world", [2, 3])
def test_tokens_equals_global_token_mean(world, ref):
    ref_losses, ref_params = ref
    runs = run_world(_runs, world)[0]
    batch_mode = runs.pop("batch-mode")
    for name, run in runs.items():
        assert run["losses"] == pytest.approx(ref_losses, rel=1e-5), name
        for pname, p in ref_params.items():
            torch.testing.assert_close(run["params"][pname], p, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{name} {pname}: {m}")
    # the data is uneven enough that the per-micro-batch mean is a different objective
    worst = max((batch_mode["params"][n] - p).abs().max().item() for n, p in ref_params.items())
    assert worst > 1e-3, f"loss_norm='batch' lands within {worst} of the token mean: the test cannot fail"


# --------------------------------------------------------------------------- Hugging Face
def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def hf_batch(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """HF causal LMs shift labels themselves: labels are the input ids, padded with -100."""
    inputs, labels = padded_global(step)
    labels = torch.cat([inputs[:, :1], labels], dim=1)[:, :-1]  # aligned with inputs
    return {"input_ids": inputs.chunk(world)[rank], "labels": labels.chunk(world)[rank]}


def hf_reference(steps: int):
    model = _tiny_gpt2()
    opt = sgd(model.parameters())
    losses = []
    for step in range(steps):
        opt.zero_grad()
        batch = hf_batch(step, 0, 1)
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        shifted = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), shifted.reshape(-1),
                               reduction="sum") / (shifted != -100).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _hf_runs() -> dict[str, dict]:
    import dtrain

    out = {}
    for name, stage in (("ddp", 0), ("zero3", 3)):
        engine = dtrain.wrap(_tiny_gpt2(), optimizer=sgd, config={"zero": {"stage": stage},
                             "train": {"grad_accum": ACCUM, "loss_norm": "tokens"}})
        rank, world = engine.runtime.rank, engine.runtime.world_size
        losses = [float(engine.train_step(hf_batch(s, rank, world))) for s in range(STEPS)]
        params = engine.full_parameters()
        out[name] = {"losses": losses, "params": params if rank == 0 else None,
                     "num_items": engine.hf_num_items}
    return out


def test_hf_causal_lm_tokens_world2():
    pytest.importorskip("transformers", reason="transformers is not installed (extra .[hf]); the HF rule "
                                               "of dtrain/loss.py is checked only where it is")
    ref_losses, ref_params = hf_reference(STEPS)
    runs = run_world(_hf_runs, 2)[0]
    import transformers

    takes_num_items = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 46)
    for name, run in runs.items():
        assert run["num_items"] == takes_num_items, "num_items_in_batch support misdetected"
        assert run["losses"] == pytest.approx(ref_losses, rel=1e-5), name
        for pname, p in ref_params.items():
            if pname in run["params"]:  # tied lm_head.weight appears once
                torch.testing.assert_close(run["params"][pname], p, atol=2e-5, rtol=1e-4,
                                           msg=lambda m: f"{name} {pname}: {m}")
