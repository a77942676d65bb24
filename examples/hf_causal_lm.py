"""Fine-tune a Hugging Face causal LM with dtrain under any layout (needs ``pip install -e ".[hf]"``).

    dtrain launch --nproc 2 --set zero.stage=3 examples/hf_causal_lm.py --steps 50
    dtrain launch --nproc 2 examples/hf_causal_lm.py --model-dir ./my-gpt2 --pack    # your local weights
    python examples/hf_causal_lm.py --steps 20                                        # one process

Without ``--model-dir`` the model is a tiny GPT-2 built from a config (nothing is downloaded) and
the tokens are the bytes of the shipped corpus; with it, the model and (if present) its tokenizer
come from that local directory. Each line of the corpus is a document: padded to the longest in
the batch (``labels = -100`` on padding), or with ``--pack`` packed whole into rows of
``--seq-len`` tokens with per-document ``position_ids``. Batches come from ``dtrain.data.loader``,
so a resumed run (``checkpoint.dir``/``checkpoint.every`` or ``snapshot.enabled``) continues with
exactly the batches it would have seen. AdamW decays matrices only: the optimizer factory takes
named parameters (``lambda named: ...``), no closure over the model needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import dtrain
import dtrain.data

CORPUS = Path(__file__).parent / "data" / "corpus.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="a local pretrained model directory (config + weights, e.g. save_pretrained)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pack", action="store_true", help="pack documents into full rows instead of padding")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout of the config-built model")
    p.add_argument("--documents", type=int, default=2000, help="corpus lines to use")
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--config", help="TOML/JSON config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--metrics", help="JSONL metrics path")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if args.model_dir:
        return AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the default loss, named (transformers warns when it is left unset)
    return model


def build_data(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, Any]:
    """The corpus lines as token documents, and the collate function for them."""
    lines = [ln for ln in Path(args.corpus).read_text().splitlines() if ln.strip()][:args.documents]
    pad_id = 0
    if args.model_dir and (Path(args.model_dir) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        docs = [tokenizer(ln)["input_ids"] for ln in lines]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    else:
        docs = [list(ln.encode()) for ln in lines]
    if args.pack:
        return (dtrain.data.PackedDataset(docs, args.seq_len, pad_id=pad_id),
                dtrain.data.packed_collate(with_lengths=False))  # HF forward takes no seq_lens
    return (dtrain.data.TokenDataset(docs, max_length=args.seq_len),
            dtrain.data.pad_collate(pad_id=pad_id, multiple_of=8))


def optimizer_factory(lr: float, weight_decay: float):
    """AdamW with weight decay on matrices only, from named parameters."""
    def factory(named):
        return torch.optim.AdamW([
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    return factory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set) + ([f'metrics.path="{args.metrics}"'] if args.metrics else [])
    model = build_model(args)
    dataset, collate = build_data(args)
    engine = dtrain.wrap(model, optimizer=optimizer_factory(args.lr, args.weight_decay), config=args.config,
                         overrides=overrides, total_steps=args.steps)
    loader = dtrain.data.loader(dataset, args.batch_size, engine=engine, collate_fn=collate)
    loss = float("nan")
    while engine.step < args.steps:
        for batch in loader:
            loss = float(engine.train_step(batch))
            if engine.step >= args.steps:
                break
    summary = engine.close()
    if engine.runtime.rank == 0:
        print(f"done: {engine.step} steps (epoch {loader.epoch}), final loss {loss:.4f}, "
              f"param_sha256 {summary['param_sha256']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
