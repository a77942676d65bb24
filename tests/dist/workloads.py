"""Training workloads shared by the multi-process tests, and their single-process reference.

The model is the tiny GPT (tied embedding / LM head) with one frozen parameter; the data is a
deterministic stream of global batches that each rank slices contiguously, so the mean loss over
the global batch is the same quantity in the reference and in every parallel run.
"""
from __future__ import annotations

from typing import Any

import torch

from dtrain.models import GPT, GPTConfig

GLOBAL_BATCH = 12  # divisible by world 2, 3, 4 and by grad_accum 2 on each of them
SEQ = 16


def make_model(seed: int = 0, frozen: bool = True) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset("tiny"))
    if frozen:
        model.pos_emb.weight.requires_grad_(False)
    return model


def optimizer_factory(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)


def sgd_two_groups(params):
    """SGD with momentum; weight decay only on matrices (two param groups, the usual GPT recipe)."""
    params = list(params)
    return torch.optim.SGD([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                           lr=0.05, momentum=0.9)


def global_batch(step: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ + 1), generator=g)


def local_batch(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    x = global_batch(step).chunk(world)[rank]
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def reference_train(steps: int, grad_accum: int = 1, clip: float | None = None,
                    model: torch.nn.Module | None = None,
                    factory=optimizer_factory) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain single-process PyTorch training on the global batch."""
    model = model or make_model()
    opt = factory([p for p in model.parameters() if p.requires_grad])
    losses = []
    for step in range(steps):
        opt.zero_grad()
        batch = local_batch(step, 0, 1)
        total = 0.0
        for mb_x, mb_y in zip(batch["input_ids"].chunk(grad_accum), batch["labels"].chunk(grad_accum)):
            loss = model(input_ids=mb_x, labels=mb_y)
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def dtrain_train(config: dict[str, Any], steps: int, model_fn=make_model,
                 factory=optimizer_factory) -> dict[str, Any]:
    """Run on every rank; rank 0 returns losses, consolidated params, state bytes and sha."""
    import dtrain

    engine = dtrain.wrap(model_fn(), optimizer=factory, config=config)
    rank, world = engine.runtime.rank, engine.runtime.world_size
    losses = [float(engine.train_step(local_batch(s, rank, world))) for s in range(steps)]
    params = engine.full_parameters()
    return {"losses": losses, "params": params if rank == 0 else None,
            "state_bytes": engine.state_bytes(), "sha": engine.param_sha256()}
