"""The ``step`` slot: a step strategy turns one train step's micro-batches into an update.

``Engine.train_step`` splits the batch into ``train.grad_accum`` micro-batches, hands them to the
strategy, then does what is the same for every strategy: LR scheduler, step counter,
``after_step`` hooks, fault injection, periodic checkpoints and the metrics record. The strategy
owns everything in between, through the layout's public methods (``zero_grad``,
``start_micro_step``, ``finish_backward``, ``grad_norm_sq``, ``scale_grads``, ``optimizer_step``)
and the engine's ``forward_objective`` (plugin ``before_forward`` hooks, autocast, the model call
and the loss normalisation of :mod:`dtrain.loss`) and ``before_update`` (plugins' hook before the
trained state changes in place: it must run before the first in-place update of the step).

:class:`FirstOrderStep` is the default (the step slot's occupant when no plugin claims it):

    zero_grad -> per micro-batch: start_micro_step -> forward -> backward (the layout reduces
    gradients as they land) -> finish_backward -> after_backward hooks -> scale by the loss
    normalisation's late factor, if any -> global-norm clipping across shards ->
    before_update -> optimizer_step

A strategy is a :class:`~dtrain.plugins.base.Plugin` in the ``step`` slot, switched on by its config
section like any plugin; two enabled step strategies are a config error. It declares:

* ``can_clip``: False for a strategy with no gradient to clip (ZO2's zeroth-order step).
  ``train.clip_grad_norm`` set together with it is a ConfigError when the engine is built
  (:meth:`StepStrategy.check_config`), never a silently skipped clip.
* ``needs_grads``: False makes the layout allocate no gradient buffers and install no gradient
  hooks (``LayoutPlugin.allocate_grads``); ``state_bytes()["grads"]`` is then 0.

``zo2`` (:mod:`dtrain.plugins.zo2`, docs/zo2.md) is forward-only (``needs_grads = False``,
``can_clip = False``: perturbed forwards and its own update of the parameters); it refuses an
optimizer factory and supplies a placeholder (:meth:`StepStrategy.optimizer_factory`) and defers
part of its update into the next step (:meth:`StepStrategy.settle` applies it before the state is
read). ``offload`` (:mod:`dtrain.offload.plugin`, docs/offload.md) is a :class:`FirstOrderStep`
that steps each unit inside backward, as the layout reports it reduced
(``LayoutPlugin.on_unit_reduced``); with clipping, or when the loss scale is known only after
backward (``StepLoss.scales_after_backward``), it defers those steps until the norm and scale are
known. ``tests/dist/test_step_strategy.py`` runs
a forward-only strategy defined in the test file at world 2.

``co2`` is a strategy: :class:`~dtrain.plugins.co2.CO2Plugin` subclasses :class:`FirstOrderStep`.
Its inner steps are exactly first-order steps (inherited ``run``) and its outer step happens in
``after_step`` at round boundaries; being the step slot's occupant is what makes co2 and ZO2
mutually exclusive (a worker either takes first-order local steps or zeroth-order ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from dtrain.config import Config, ConfigError
from dtrain.plugins.base import LayoutPlugin, OptimizerFactory, Plugin

if TYPE_CHECKING:
    from dtrain.engine import Engine


@dataclass
class StepOutcome:
    """What a strategy reports about its step."""

    loss: torch.Tensor
    """This rank's share of the step loss (a scalar): its mean over the data-parallel group's
    ranks is the step's loss (``StepLoss.local_loss()``)."""
    grad_norm: float | None = None
    """Global gradient L2 norm before clipping, when clipping ran."""


class StepStrategy(Plugin):
    """Base class of the step slot's occupants."""

    slot: ClassVar[str] = "step"
    can_clip: ClassVar[bool] = True
    """Whether the strategy honours ``train.clip_grad_norm`` (exactly, across shards)."""
    needs_grads: ClassVar[bool] = True
    """False: the layout allocates no gradient buffers (forward-only strategies)."""

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Refuse settings the strategy cannot honour (one-line ConfigError)."""
        if config.train.clip_grad_norm is not None and not cls.can_clip:
            raise ConfigError(f"train.clip_grad_norm = {config.train.clip_grad_norm!r} cannot be used with the "
                              f"{cls.name!r} step strategy, which computes no gradient to clip; "
                              f"remove train.clip_grad_norm or disable {cls.name}")

    def run(self, micro_batches: list[Any]) -> StepOutcome:
        """Turn this step's micro-batches into an update of the trained state."""
        raise NotImplementedError

    def optimizer_factory(self, factory: OptimizerFactory | None) -> OptimizerFactory:
        """The factory the layout builds its optimizer with, given the one passed to ``dtrain.wrap``
        (a strategy that updates the parameters itself refuses a factory and supplies its own)."""
        if factory is None:
            raise ConfigError(f"dtrain.wrap(optimizer=None) needs a step strategy that updates the parameters "
                              f"itself (zo2); the {self.name!r} strategy needs an optimizer factory")
        return factory

    def settle(self) -> None:
        """Bring the trained state up to date with every completed step before it is read (save,
        ``full_parameters``, eval): a strategy that defers part of a step's update into the next
        step's pass (zo2's streamed blocks) applies it now. Default: nothing is deferred."""


class FirstOrderStep(StepStrategy):
    """Forward, backward, gradient reduction, clipping, one optimizer step (the default)."""

    name = "first_order"

    def run(self, micro_batches: list[Any]) -> StepOutcome:
        engine, layout = self.engine, self.engine.layout
        losses = engine.step_loss(micro_batches)
        layout.zero_grad()
        last = len(micro_batches) - 1
        for i, micro in enumerate(micro_batches):
            layout.start_micro_step(i, i == last)
            engine.forward_objective(micro, i, losses).backward()
            layout.finish_backward()
            for plugin in engine.plugins:
                plugin.after_backward(i, i == last)
        grad_norm = scale_and_clip(layout, losses.finish(), engine.config.train.clip_grad_norm)
        engine.before_update()
        layout.optimizer_step()
        return StepOutcome(losses.local_loss(), grad_norm)


def scale_and_clip(layout: LayoutPlugin, scale: float, max_norm: float | None) -> float | None:
    """Multiply the reduced gradients by ``scale`` and clip their global L2 norm to ``max_norm``
    with one pass over them; returns the norm after scaling, before clipping (None: no clipping).
    The clip rule is torch.nn.utils.clip_grad_norm_'s: multiply by max_norm / (norm + 1e-6) if < 1."""
    norm = None
    if max_norm is not None:
        norm = scale * math.sqrt(float(layout.grad_norm_sq()))
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            scale *= coef
    if scale != 1.0:
        layout.scale_grads(scale)
    return norm
