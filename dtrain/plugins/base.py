"""Plugin interface: slots, no-op hooks, and the name registry.

The engine runs one ``train_step`` skeleton and calls the plugins at fixed points. Each plugin
fills one *slot* (layout, step, tier, data, resilience); a slot has exactly one occupant. Hooks do
nothing by default, so a plugin overrides only what it changes.

The *layout* slot is special: its occupant owns where parameters, gradients and optimizer state
live, so it also builds the optimizer, reduces gradients and reports state bytes
(:class:`LayoutPlugin`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn as nn

from dtrain.config import ConfigError

if TYPE_CHECKING:
    from dtrain.engine import Engine

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

_REGISTRY: dict[str, type["Plugin"]] = {}


def register(cls: type["Plugin"]) -> type["Plugin"]:
    """Class decorator: make a plugin available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"plugin name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def plugin_class(name: str) -> type["Plugin"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown plugin {name!r}; registered: {sorted(_REGISTRY)}") from None


def enabled_plugins(config: Any) -> list[type["Plugin"]]:
    """Non-layout plugins switched on by ``config``; two occupants of one slot are an error."""
    chosen: dict[str, type[Plugin]] = {}
    for cls in _REGISTRY.values():
        if cls.slot != "layout" and cls.enabled(config):
            if cls.slot in chosen:
                other = chosen[cls.slot]
                raise ConfigError(f"plugins {other.name!r} and {cls.name!r} both occupy the {cls.slot!r} "
                                  f"slot; enable only one of them ({other.name}.enabled or {cls.name}.enabled)")
            chosen[cls.slot] = cls
    return list(chosen.values())


class Plugin:
    """Base class: every hook is a no-op."""

    name: ClassVar[str] = "base"
    slot: ClassVar[str] = "none"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """Whether ``config`` switches this plugin on (default: its section says ``enabled = true``)."""
        section = getattr(config, cls.name, None)
        return bool(getattr(section, "enabled", False))

    def setup(self, engine: "Engine") -> None:
        self.engine = engine

    def before_forward(self, batch: Any) -> Any:
        return batch

    def after_backward(self, micro_step: int, last_micro_step: bool) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def before_update(self) -> None:
        """Called before the engine changes the trained state in place: the optimizer step of every
        train step, and a ``load``. State handed out at ``after_step`` is valid until then."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def restore(self) -> str | None:
        """Bring the engine back to its newest saved state at start-up (resilience plugins).

        Returns a one-line description of what was restored, or None to let the engine try
        ``checkpoint.dir``.
        """
        return None

    def on_failure(self, exc: BaseException) -> None:
        pass

    def teardown(self) -> None:
        pass


class LayoutPlugin(Plugin):
    """Owns parameter / gradient / optimizer-state placement (ddp, zero, hierarchical)."""

    slot: ClassVar[str] = "layout"
    optimizer: torch.optim.Optimizer
    allocate_grads: bool = True
    """Set by the engine before ``wrap_model`` from the step strategy's ``needs_grads``: False means
    no gradient buffers and no gradient hooks (forward-only strategies, dtrain/plugins/step.py)."""

    def wrap_model(self, model: nn.Module, factory: OptimizerFactory) -> None:
        """Lay out the model's state and build ``self.optimizer`` from ``factory``."""
        raise NotImplementedError

    def start_micro_step(self, micro_step: int, last_micro_step: bool) -> None:
        """Called before each micro-batch's forward."""

    def finish_backward(self) -> None:
        """Complete every gradient reduction of the current micro-step."""
        raise NotImplementedError

    def grad_norm_sq(self) -> torch.Tensor:
        """Squared global L2 norm of the (reduced) gradients, identical on every rank."""
        raise NotImplementedError

    def scale_grads(self, factor: float) -> None:
        raise NotImplementedError

    def optimizer_step(self) -> None:
        """Step the optimizer on the owned state and publish the new parameters."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def state_bytes(self) -> dict[str, int]:
        """Bytes of params, grads and optimizer state this rank holds persistently."""
        raise NotImplementedError

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 parameters by name (a collective on sharded layouts)."""
        raise NotImplementedError
