"""Zeroth-order fine-tuning (zo2: MeZO-SGD, optional block streaming) of the example GPT on the
shipped corpus; with ``zo2.enabled=false`` the same script is the first-order (AdamW) baseline.

    dtrain launch examples/zo_finetune.py                                        # zo2, in memory
    dtrain launch --nproc 2 examples/zo_finetune.py --set zo2.stream=host        # 2 ranks, blocks streamed
    dtrain launch examples/zo_finetune.py --set zo2.enabled=false                # first-order baseline
    python examples/train_gpt.py --steps 300 --set checkpoint.dir=ckpt/pre --set checkpoint.every=300
    python examples/zo_finetune.py --init ckpt/pre/step-000000300                # fine-tune that

Zeroth-order methods fine-tune: started from random weights they learn slowly (the gradient
estimate's variance grows with the parameter count), so pass ``--init`` (a dtrain checkpoint,
e.g. one written by examples/train_gpt.py) for a real fine-tune. Batches come from (seed, step)
exactly as in train_gpt.py, so any number of ranks with the same ``--batch-size`` sees the same
global batches and a resumed run continues bit for bit. docs/zo2.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import dtrain
from dtrain.models import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).parent))
from train_gpt import CORPUS, batch_for  # noqa: E402  (one batching rule for both examples)

ZO_DEFAULTS = ["zo2.enabled=true", "zo2.lr=1e-4", "zo2.eps=1e-3"]
"""Applied before --config/--set, which override them."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML/JSON config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--metrics", help="JSONL metrics path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences per step)")
    p.add_argument("--model", default="small", help="GPT preset: tiny, small, bench")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of the first-order baseline")
    p.add_argument("--init", help="dtrain checkpoint directory to fine-tune from (default: random weights)")
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--eval-batches", type=int, default=2, help="held-out batches evaluated at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [*ZO_DEFAULTS, *args.set, f"train.seed={args.seed}", f"zo2.seed={args.seed}"]
    if args.metrics:
        overrides.append(f'metrics.path="{args.metrics}"')
    config = dtrain.load_config(args.config, overrides)
    data = torch.frombuffer(bytearray(Path(args.corpus).read_bytes()), dtype=torch.uint8)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig.preset(args.model, vocab_size=256))
    if args.init:
        model.load_state_dict(dtrain.consolidate(args.init), strict=False)
    zeroth_order = config.zo2.enabled
    factory = None if zeroth_order else (lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.1))
    engine = dtrain.wrap(model, optimizer=factory, config=config, total_steps=args.steps)
    rank, world = engine.runtime.rank, engine.runtime.world_size
    if args.batch_size % world or (args.batch_size // world) % engine.config.train.grad_accum:
        raise dtrain.UsageError(f"--batch-size {args.batch_size} must split evenly over {world} ranks and "
                                f"train.grad_accum={engine.config.train.grad_accum} micro-batches; pass a "
                                f"multiple of {world * engine.config.train.grad_accum}")
    block = model.cfg.block_size
    loss = float("nan")
    while engine.step < args.steps:
        loss = float(engine.train_step(batch_for(data, engine.step, args.seed, args.batch_size, block, rank, world)))
    held_out = [engine.eval_step(batch_for(data, 10**9 + i, args.seed, args.batch_size, block, rank, world))
                for i in range(args.eval_batches)]
    summary = engine.close()
    if rank == 0:
        kind = f"zo2 (stream={config.zo2.stream})" if zeroth_order else "first-order AdamW"
        print(f"done ({kind}): {engine.step} steps, final loss {loss:.4f}, held-out loss "
              f"{sum(float(x) for x in held_out) / max(1, len(held_out)):.4f}, "
              f"param_sha256 {summary['param_sha256']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
