"""FlexSP runtime: sequence-parallel groups of different sizes per step (docs/seqpar.md).

Modules: :mod:`config` (the ``seqpar`` section, torch-free), :mod:`ulysses` (Ulysses attention
in the rank's current group: :func:`attention`), :mod:`schedule` (what a step runs; hand-written
plans; the one-broadcast encoding), :mod:`plugin` (the plugin: planning, lookahead, packing,
metrics), :mod:`lengths` (length mixes for examples and benchmarks). Torch loads on first use of
a name below, so the launcher can import :mod:`config` alone.
"""
from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "SeqParContext": "ulysses", "SeqParError": "ulysses", "activate": "ulysses", "attention": "ulysses",
    "current": "ulysses", "SeqBatch": "plugin", "SeqParPlugin": "plugin", "ahead": "plugin",
    "sample_lengths": "lengths",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'dtrain.seqpar' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dtrain.seqpar.{_NAMES[name]}"), name)
