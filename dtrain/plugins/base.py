"""Plugin interface: slots, no-op hooks, and the name registry.

The engine runs one ``train_step`` skeleton and calls the plugins at fixed points. Each plugin
fills one *slot* (layout, step, tier, data, resilience); a slot has exactly one occupant. Hooks do
nothing by default, so a plugin overrides only what it changes.

A plugin declares its config section as a nested ``Config`` dataclass; :func:`register` makes it
the section ``config.<name>`` (:func:`dtrain.config.register_section`). Writing a plugin:
docs/plugins.md.

The *layout* slot is special: its occupant owns where parameters, gradients and optimizer state
live, so it also builds the optimizer, reduces gradients and reports state bytes
(:class:`LayoutPlugin`). Everything else (checkpoints, snapshots, other plugins) reaches that
state only through the layout's descriptors: ``unit_specs``, ``shards(kind)``,
``optimizer_pieces`` and ``publish`` (docs/layouts.md).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn as nn

from dtrain.config import ConfigError, register_section

if TYPE_CHECKING:
    from dtrain.engine import Engine
    from dtrain.partition import Piece, Shard, UnitSpec

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

_REGISTRY: dict[str, type["Plugin"]] = {}
BUILTIN_PLUGIN_MODULES = ("dtrain.plugins.zero", "dtrain.plugins.co2", "dtrain.plugins.snapshot", "dtrain.seqpar.plugin",
                          "dtrain.offload.plugin", "dtrain.plugins.zo2")


def register(cls: type["Plugin"]) -> type["Plugin"]:
    """Class decorator: make a plugin available by its ``name``, and its nested ``Config`` (if any)
    the config section ``config.<name>``. Re-registering a re-definition of the same class (a
    script imported twice) replaces it; another class under a taken name is an error."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"plugin name {cls.name!r} is registered twice")
    section = cls.__dict__.get("Config")
    if section is not None:
        register_section(cls.name, section)
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in BUILTIN_PLUGIN_MODULES:
        importlib.import_module(module)  # each registers its plugins on first import


def plugin_class(name: str) -> type["Plugin"]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown plugin {name!r}; registered: {sorted(_REGISTRY)}") from None


def enabled_plugins(config: Any) -> list[type["Plugin"]]:
    """Non-layout plugins switched on by ``config``; two occupants of one slot are an error."""
    _load_builtins()
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
    """Base class: every hook is a no-op.

    ``name`` names the plugin and its config section; ``slot`` is the slot it occupies (one
    occupant per slot: an observer takes a slot name of its own); a nested dataclass ``Config``
    declares its section (read it as ``self.engine.config.<name>``).
    """

    name: ClassVar[str] = "base"
    slot: ClassVar[str] = "none"
    global_state: ClassVar[bool] = False
    """``state_dict`` is the same on every rank and independent of the world size, so a checkpoint
    hands it back at another world size too (otherwise only at the same one)."""

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """Whether ``config`` switches this plugin on (default: its section says ``enabled = true``)."""
        section = getattr(config, cls.name, None)
        return bool(getattr(section, "enabled", False))

    def setup(self, engine: "Engine") -> None:
        self.engine = engine

    def split_batch(self, batch: Any, parts: int) -> "tuple[list[Any], int] | None":
        """Turn ``train_step``'s batch into this rank's micro-batches and the number of real tokens
        they hold (the metrics' token count), or None to leave it to the engine (split along dim 0
        into ``parts``). The first plugin that returns something wins (seqpar: the plan's
        micro-batches)."""
        return None

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

    def state_bytes_by_tier(self) -> dict[str, dict[str, int]]:
        """Bytes this rank holds per tier (device / host / nvme) and kind (params, grads, optim)."""
        if self._tier_report is not None:
            return self._tier_report()
        out: dict[str, dict[str, int]] = {}
        for kind, n in self.state_bytes().items():
            out.setdefault("device", {})[kind] = n
        return out

    # ------------------------------------------------------------ tier plugin hooks
    _tier_report: "Callable[[], dict[str, dict[str, int]]] | None" = None
    _optim_tier: str = "device"

    def on_unit_reduced(self, callback: "Callable[[UnitSpec], None] | None") -> bool:
        """Ask for ``callback(unit)`` on the training thread as soon as a unit's gradient of the
        step's last micro-step is reduced (complete on this rank; ``None`` stops it), so a tier
        plugin can step that unit while backward goes on (docs/offload.md). Returns False when the
        layout cannot say (the caller then steps every unit after ``finish_backward``)."""
        return False

    def place_optim_state(self, tier: str, report: "Callable[[], dict[str, dict[str, int]]]") -> None:
        """A tier plugin keeps the element-wise optimizer state on ``tier`` (``host``/``nvme``):
        ``shards("optim.<key>")`` say so, and ``state_bytes_by_tier`` returns ``report()``."""
        self._optim_tier, self._tier_report = tier, report

    def place_params(self, tier: Any) -> bool:
        """A tier plugin keeps each unit's parameter part on ``tier.name`` between uses
        (dtrain/offload/params.py): the layout calls ``tier.fetch(spec)`` before it reads a unit's
        part and ``tier.drop(spec)`` once it copied it out, and ``shards("param")``/``("master")``
        carry ``tier.home(spec)`` and the tier. Returns False where the layout cannot (default)."""
        return False

    def release_grad(self, spec: "UnitSpec") -> bool:
        """A tier plugin has stepped ``spec``'s unit with this step's gradient: the layout may free
        the unit's gradient until its next gradient arrives (it comes back zeroed, before anything
        reads it). Returns False where the layout keeps it (default)."""
        return False

    # ------------------------------------------------------------- descriptors
    def unit_specs(self) -> "list[UnitSpec]":
        """Every unit's flat space (parameter names, shapes, offsets, groups, padded size)."""
        raise NotImplementedError

    def placement(self, kind: str) -> tuple[str, int, int]:
        """(level, parts, index): the kind is split into ``parts`` over this rank's group at
        ``level`` and this rank holds part ``index``. Optimizer kinds follow ``master``."""
        raise NotImplementedError

    def part_holders(self, kind: str) -> list[int]:
        """The ranks of rank 0's group holding each part of ``kind``: ``holders[i]`` holds part i
        (a checkpoint's rank-to-range map). Default: the group's ranks in order."""
        level = self.placement(kind)[0]
        return [0] if level == "rank" else self.engine.comm.group_ranks(level)

    def optimizer_pieces(self) -> "list[tuple[UnitSpec, Piece]]":
        """The optimizer's parameters with the unit and range each covers (``Piece.tensor`` is
        the key in ``optimizer.state``), in unit order. Parameters of the optimizer not listed
        are empty placeholders (a rank that owns no element of a param group still steps it)."""
        raise NotImplementedError

    def shards(self, kind: str) -> "list[Shard]":
        """Where ``kind`` (param, grad, master, optim.<key>) of every unit lives on this rank."""
        raise NotImplementedError

    def publish(self) -> None:
        """The master values changed outside an optimizer step (a load, an outer step): make the
        working parameters consistent with them again (collective)."""
        raise NotImplementedError

    def optim_shards(self, key: str) -> "list[Shard]":
        """``shards("optim.<key>")`` built from the optimizer's state on ``optimizer_pieces``."""
        from dtrain.partition import Piece, Shard

        level, parts, index = self.placement("master")
        by_unit: dict[int, list[Piece]] = {}
        for unit, piece in self.optimizer_pieces():
            value = self.optimizer.state.get(piece.tensor, {}).get(key)
            if torch.is_tensor(value):
                by_unit.setdefault(unit.index, []).append(Piece(piece.lo, piece.hi, value, piece.group))
        primary = self.shards("master")[0].primary if self.unit_specs() else True
        out = []
        for spec in self.unit_specs():
            lo, hi = spec.shard_range(parts, index)
            out.append(Shard(spec, f"optim.{key}", level, parts, index, lo, hi,
                             tuple(by_unit.get(spec.index, ())), tier=self._optim_tier,  # type: ignore[arg-type]
                             primary=primary))
        return out

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 parameters by name (a collective on sharded layouts)."""
        raise NotImplementedError
