"""A training run that records which samples every step consumed (driven by test_data_resume.py).

    dtrain launch --nproc 2 [--inject ...] tests/dist/data_resume_run.py --steps 12 --out DIR

Samples are token windows drawn from a generator seeded by their index; the model is the tiny GPT
with dropout (so the RNG state matters too); ``dtrain.data.loader`` deals 3 samples per rank per
step from 30 samples (5 steps per epoch, so 12 steps cross two epoch ends). Before every step each
rank appends ``{"step", "ids", "position"}`` to ``DIR/rank{R}.jsonl``; a resumed attempt appends
the steps it redoes again, and the last record of a step is the one that counts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn

import dtrain
import dtrain.data
from dtrain.models import GPT, GPTConfig

SAMPLES, PER_RANK, SEQ = 30, 3, 16


class Windows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, 256, (SEQ + 1,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x[:-1], "labels": x[1:], "index": torch.tensor(i)}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT(GPTConfig.preset("tiny", dropout=0.1))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids, labels)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    engine = dtrain.wrap(Model(), optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
                         total_steps=args.steps)
    loader = dtrain.data.loader(Windows(), PER_RANK, engine=engine)
    log = Path(args.out) / f"rank{engine.runtime.rank}.jsonl"
    while engine.step < args.steps:
        for batch in loader:
            # recorded before the step: a fault fires inside train_step, after the step's snapshot
            # may have committed, and a resume from that snapshot does not redo the step
            with log.open("a") as f:
                f.write(json.dumps({"step": engine.step + 1, "ids": batch["index"].tolist(),
                                    "position": list(loader.position)}) + "\n")
            engine.train_step(batch)
            if engine.step >= args.steps:
                break
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
