"""A compact decoder-only transformer (GPT) for the example, the tests and the benchmarks.

The token embedding and the LM head share one weight (tied), so every layout in dtrain is
exercised with a tied parameter. ``forward(input_ids, labels=None, position_ids=None)`` returns the mean
cross-entropy loss when labels are given, else the logits. Under sequence parallelism
(:mod:`dtrain.seqpar`) the attention runs :func:`dtrain.seqpar.attention` on packed sequences
whose ``position_ids`` restart per sequence; otherwise the path is plain causal attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.seqpar import ulysses as seqpar


@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    @classmethod
    def preset(cls, name: str, **overrides: int) -> "GPTConfig":
        """Named sizes: ``tiny`` (tests), ``small`` (example, ~0.8M params), ``bench`` (~28M)."""
        presets = {
            "tiny": dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
            "small": dict(block_size=128, n_layer=4, n_head=4, n_embd=128),
            "bench": dict(vocab_size=8192, block_size=256, n_layer=6, n_head=8, n_embd=576),
        }
        if name not in presets:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if seqpar.current() is not None:  # sequence parallelism: x is this rank's slice of a packed group
            y = seqpar.attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.register_buffer("pos_ids", torch.arange(cfg.block_size), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        if position_ids is None:
            if t > self.cfg.block_size:
                raise ValueError(f"sequence length {t} exceeds block_size {self.cfg.block_size}")
            x = self.tok_emb(input_ids) + self.pos_emb(self.pos_ids[:t])
        else:  # packed sequences (dtrain.seqpar): positions restart per sequence
            x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))
