"""dtrain public API: wrap, Config, consolidate, init; UsageError and ConfigError (dtrain/errors.py).

    engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4),
                         config={"zero": {"stage": 3}})
    loss = engine.train_step(batch)
    engine.save("ckpt/"); state_dict = dtrain.consolidate("ckpt/")
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

from dtrain.config import Config, ConfigError
from dtrain.errors import UsageError

if TYPE_CHECKING:  # torch-heavy modules load on first use: helper processes import only what they need
    import torch.nn as nn

    from dtrain.engine import Engine, LossFn, SchedulerFactory
    from dtrain.plugins.base import OptimizerFactory
    from dtrain.runtime import Runtime

__version__ = "0.1.0"
__all__ = ["wrap", "Config", "ConfigError", "UsageError", "consolidate", "init", "Engine", "data", "__version__"]


def init(config: Config | Mapping[str, Any] | str | os.PathLike | None = None) -> Runtime:
    """Initialise the process group, topology and comm layer (idempotent)."""
    from dtrain.runtime import init as _init_runtime

    return _init_runtime(load_config(config))


def load_config(config: Config | Mapping[str, Any] | str | os.PathLike | None = None,
                overrides: list[str] | None = None) -> Config:
    """The run's Config: ``config`` (or ``DTRAIN_CONFIG``), then launcher and explicit overrides."""
    from dtrain.launch.env import read_launch_env

    env = read_launch_env()
    source = config if config is not None else env.config_path
    cfg = Config.load(source, [*env.overrides, *(overrides or [])])
    if env.timeout_s is not None:
        cfg.comm.timeout_s = env.timeout_s
    return cfg


def wrap(model: nn.Module, optimizer: OptimizerFactory | None,
         config: Config | Mapping[str, Any] | str | os.PathLike | None = None, *,
         loss_fn: LossFn | None = None, scheduler: SchedulerFactory | None = None,
         overrides: list[str] | None = None, total_steps: int | None = None) -> Engine:
    """Wrap ``model`` for training under the plugins that ``config`` selects.

    ``optimizer`` is a factory ``params -> torch.optim.Optimizer`` over the trainable parameters;
    a factory whose first parameter is called ``named`` (or ``named_params``/``named_parameters``)
    gets ``(name, parameter)`` pairs instead, so param groups need no closure over the model::

        lambda named: torch.optim.AdamW([
            {"params": [p for n, p in named if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}], lr=3e-4)

    Under the ``zo2`` step strategy (zeroth-order, docs/zo2.md) pass ``optimizer=None``: zo2
    updates the parameters itself, and a factory would be ignored, so it is an error.

    ``scheduler`` an optional
    factory ``optimizer -> LR scheduler`` stepped once per ``train_step``. Launcher settings
    (``dtrain launch --set/--config/--metrics``) are applied on top of ``config``.
    """
    from dtrain.engine import Engine
    from dtrain.runtime import init as _init_runtime

    cfg = load_config(config, overrides)
    runtime = _init_runtime(cfg)
    return Engine(model, optimizer, cfg, runtime, loss_fn=loss_fn, scheduler=scheduler,
                  total_steps=total_steps)


def consolidate(directory: str | os.PathLike) -> dict[str, Any]:
    """A plain fp32 state_dict (parameters and buffers) from a dtrain checkpoint directory."""
    from dtrain.checkpoint import consolidate as _consolidate

    return _consolidate(directory)


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from dtrain.engine import Engine

        return Engine
    if name == "data":
        import dtrain.data

        return dtrain.data
    raise AttributeError(f"module 'dtrain' has no attribute {name!r}")
