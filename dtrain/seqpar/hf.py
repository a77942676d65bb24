"""Hugging Face models under sequence parallelism: route their attention through
:func:`dtrain.seqpar.attention` (docs/seqpar.md, "Adapting another model").

Transformers (>= 4.48) looks a model's attention function up by ``config._attn_implementation``
in ``AttentionInterface``; :func:`use_seqpar_attention` registers ``"dtrain_seqpar"`` there and
switches the model to it. The function ignores HF's attention mask (attention is causal within
each packed sequence, which is what the mask would say) and falls back to plain causal attention
when no seqpar context is active.

HF causal LMs shift their labels inside ``forward``; under seqpar the labels arrive already
shifted (and a rank holds a slice, so a shift inside it would lose the token across the slice
border). :class:`SeqParCausalLM` wraps such a model: it routes the attention, calls the model
without labels and returns the mean cross-entropy of the logits against the labels as given, so
the engine counts valid tokens as ``labels != -100`` (dtrain/loss.py rule 1).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.seqpar.ulysses import attention

NAME = "dtrain_seqpar"


def seqpar_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF attention-interface signature: ``[B, H, T, hd]`` in, ``([B, T, H, hd], None)`` out."""
    if key.shape[1] != query.shape[1]:  # grouped-query attention: one k/v head per query head
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    out = attention(query, key, value, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def use_seqpar_attention(model: Any) -> Any:
    """Make ``model`` (a transformers PreTrainedModel) call :func:`seqpar_attention_forward`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, seqpar_attention_forward)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        model.config._attn_implementation = NAME
    return model


class SeqParCausalLM(nn.Module):
    """A transformers causal LM for the seqpar plugin: ``forward(input_ids, labels, position_ids)``
    returns the mean cross-entropy over ``labels != -100`` (labels not shifted again)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = use_seqpar_attention(model)
        self.config = model.config  # the plugin reads layers, width, heads and positions here

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, position_ids=position_ids).logits
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
