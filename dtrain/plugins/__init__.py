"""Runtime plugins: the public plugin API and the built-in plugins.

    from dtrain.plugins import Plugin, register

Importing this package stays torch-free, so the launcher can import the built-in plugins'
config sections (``dtrain.plugins.co2_config``, ``dtrain.plugins.snapshot_config``) without
torch; ``Plugin``, ``LayoutPlugin`` and ``register`` load :mod:`dtrain.plugins.base` on first
use, and the built-in plugins (ddp, zero1-3, co2, snapshot) register when the engine first looks
a plugin up. Writing a plugin: docs/plugins.md.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Plugin", "LayoutPlugin", "register"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dtrain.plugins import base

        return getattr(base, name)
    raise AttributeError(f"module 'dtrain.plugins' has no attribute {name!r}")
