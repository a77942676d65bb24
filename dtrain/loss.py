"""Loss normalisation (``train.loss_norm``): how each micro-batch's loss becomes its share of the
step's objective, and which loss ``train_step`` returns.

``"batch"`` (default): every micro-batch's loss counts the same. The objective of a step is the
mean over the data-parallel ranks of the mean over the rank's ``grad_accum`` micro-batches of
the loss the model (or ``loss_fn``) returns. Exact when every micro-batch has the same number of
valid tokens.

``"tokens"``: the objective is the sum of the per-token losses of the whole step divided by the
number of valid tokens N of the whole step over the data-parallel group (all ranks under ddp and
ZeRO; the worker under co2, whose workers train separate replicas). Uneven padding across
micro-batches and ranks then gives exactly the gradient of the global-batch token mean. Each
micro-batch's sum of per-token losses S and its valid-token count n come from one of three rules:

1. **Default** (no ``loss_fn`` and not a Hugging Face causal LM, or a ``loss_fn`` returning a
   scalar): the loss is taken as the mean over the micro-batch's valid tokens,
   n = ``batch["loss_mask"].sum()`` if the batch has a ``loss_mask``, else
   ``(batch["labels"] != -100).sum()``, and S = loss * n. This is what a model computing
   ``cross_entropy(logits, labels, ignore_index=-100)`` on labels it does not shift returns.
2. **``loss_fn`` returning ``(loss_sum, n_tokens)``**: S and n as returned (for losses whose valid
   tokens are not ``labels != -100``, e.g. labels shifted inside the loss). n is known only after
   the forward, so the gradients are computed unnormalised and scaled by 1/N once every
   micro-batch is done (one all-reduce of the counts after the last backward).
3. **Hugging Face causal LMs** (a ``transformers.PreTrainedModel`` whose class name ends in
   ``ForCausalLM`` or ``LMHeadModel``, with no ``loss_fn``): they shift labels inside the model,
   so n = ``(labels[..., 1:] != -100).sum()``. If the model's forward takes
   ``num_items_in_batch`` (transformers >= 4.46), it is passed N, so the model returns S / N
   directly (reduction "sum" divided by N, as the HF Trainer does); otherwise S = loss * n.

Rules 1 and 3 know n before the forward: the counts of every micro-batch are summed and
all-reduced once (asynchronously, started before the first forward and waited for before the
first backward), and each micro-batch's objective is S * P / N, where P is the size of the
data-parallel group: layouts pre-divide gradients by P before summing them over the group
(:mod:`dtrain.plugins.zero`), so the reduced gradient is exactly grad(sum S) / N.

The loss ``train_step`` returns (and the metrics record) is the step's objective value: under
"tokens" the global-batch token mean, under "batch" the mean of the micro-batch losses. A
micro-batch without a valid token contributes nothing (its weight is 0; torch's ``cross_entropy``
gives finite zero gradients for an empty mean). A step whose whole group has no valid token is an
error.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from dtrain.comm import Comm, Handle

LossOutput = torch.Tensor | tuple[torch.Tensor, "torch.Tensor | int"]
LossFn = Callable[[Any, Any], LossOutput]
LossNorm = Literal["batch", "tokens"]


def is_hf_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM (shifts its labels inside forward), detected without importing transformers."""
    is_hf = any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
                for c in type(model).__mro__)
    name = type(model).__name__
    return is_hf and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel"))


def takes_num_items_in_batch(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``num_items_in_batch`` (by name, or through ``**kwargs``
    into a HF ``loss_function``, which is how transformers >= 4.46 passes it on)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if "num_items_in_batch" in params:
        return True
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return var_kw and hasattr(type(model), "loss_function")


def valid_tokens(batch: Any, shifted: bool = False) -> torch.Tensor | None:
    """The micro-batch's valid-token count (an int64 scalar), or None when the batch carries neither
    ``loss_mask`` nor ``labels``. ``shifted``: labels are shifted inside the model (HF causal LMs)."""
    if not isinstance(batch, dict):
        return None
    if not shifted and "loss_mask" in batch:
        return batch["loss_mask"].sum().to(torch.int64)
    labels = batch.get("labels")
    if not torch.is_tensor(labels):
        return None
    if shifted:
        labels = labels[..., 1:]
    return (labels != -100).sum().to(torch.int64)


def model_loss(output: Any, batch: Any, loss_fn: LossFn | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss, n)`` from a forward's output: ``n`` is None unless ``loss_fn`` returned ``(sum, n)``."""
    n = None
    if loss_fn is not None:
        loss = loss_fn(output, batch)
        if isinstance(loss, tuple):
            if len(loss) != 2:
                raise TypeError("loss_fn must return a scalar loss or a (loss_sum, n_tokens) pair")
            loss, n = loss
            n = torch.as_tensor(n).detach().to(torch.int64).reshape(())
    elif torch.is_tensor(output):
        loss = output
    elif isinstance(output, dict) and "loss" in output:
        loss = output["loss"]
    elif getattr(output, "loss", None) is not None:
        loss = output.loss
    else:
        raise TypeError(f"the model returned {type(output).__name__}, not a loss; "
                        f"pass loss_fn=(output, batch) -> loss to dtrain.wrap")
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise TypeError("the loss must be a scalar tensor; reduce it (e.g. .mean()) in loss_fn")
    return loss.reshape(()), n


class StepLoss:
    """One step's loss normalisation over its micro-batches (see the module docstring).

    A step strategy calls, for micro-batch ``i``: ``model_kwargs(i)`` (extra forward arguments),
    then ``objective(i, loss, n)`` on the forward's loss, which returns the tensor to
    differentiate (or just evaluate) and records its value; after the last micro-batch,
    ``finish()`` returns the factor the reduced gradients must still be multiplied by (1.0 unless
    a ``loss_fn`` returned ``(sum, n)``), and ``local_loss()`` this rank's share of the step loss:
    its mean over the data-parallel group's ranks is the step's loss.
    """

    def __init__(self, mode: LossNorm, micro_batches: list[Any], comm: Comm, level: str,
                 device: torch.device, hf_causal: bool = False, hf_num_items: bool = False) -> None:
        self.mode, self.comm, self.level, self.device = mode, comm, level, device
        self.accum = len(micro_batches)
        self.group_size = comm.size(level)
        self.hf_causal, self.hf_num_items = hf_causal, hf_num_items
        self._sum = torch.zeros((), dtype=torch.float64, device=device)
        self._deferred: bool | None = None  # set by the first objective(): (sum, n) returns defer
        self._deferred_count = torch.zeros((), dtype=torch.int64, device=device)
        self._total: int | None = None
        self._handle: Handle | None = None
        self.counts: list[int] | None = None
        if mode == "tokens":
            counts = [valid_tokens(b, shifted=hf_causal) for b in micro_batches]
            if all(c is not None for c in counts):
                stacked = torch.stack([c.to(device) for c in counts])
                self._count_buf = stacked.sum().reshape(1)
                self._handle = comm.all_reduce(self._count_buf, level, async_op=True)
                self.counts = stacked.tolist()

    @property
    def known_up_front(self) -> bool:
        """Whether the step's token total is known before the first backward (False only under
        "tokens" with a batch that carries neither labels nor loss_mask: a ``loss_fn`` must then
        return ``(sum, n)``, and gradients are normalised after the last backward)."""
        return self.mode == "batch" or self.counts is not None

    @property
    def scales_after_backward(self) -> bool:
        """Whether :meth:`finish` may return a factor other than 1 (``tokens`` with a ``loss_fn``
        returning ``(sum, n)``): known once the first micro-batch's objective was taken."""
        return self.mode == "tokens" and bool(self._deferred)

    def total(self) -> int:
        """N: valid tokens of the step over the data-parallel group (waits for the all-reduce)."""
        if self._total is None:
            if self._handle is None:
                raise RuntimeError("the token total is not known before the forward in this step")
            self._handle.wait()
            self._handle = None
            self._total = int(self._count_buf.item())
            self._check_total()
        return self._total

    def _check_total(self) -> None:
        if self._total <= 0:
            raise ValueError(f"train.loss_norm = 'tokens': this step has no valid token on any rank of the "
                             f"'{self.level}' group (every label is -100 or every loss_mask is 0)")

    def model_kwargs(self, index: int) -> dict[str, Any]:
        """Extra keyword arguments of micro-batch ``index``'s forward (HF's ``num_items_in_batch``)."""
        if self.mode == "tokens" and self.hf_num_items and self.counts is not None:
            return {"num_items_in_batch": self.total()}
        return {}

    def objective(self, index: int, loss: torch.Tensor, n: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor to differentiate for micro-batch ``index``, whose forward returned ``loss``
        (and ``n`` when a ``loss_fn`` returned ``(sum, n)``). Records the value for ``local_loss``."""
        deferred = n is not None
        if self._deferred is None:
            self._deferred = deferred
        elif self._deferred != deferred:
            raise TypeError("loss_fn returned a (loss_sum, n_tokens) pair for some micro-batches and a scalar "
                            "for others; return the same form every time")
        if self.mode == "batch":
            if deferred:  # a (sum, n) pair is its mean here
                loss = loss / n.to(loss.device).clamp(min=1)
            self._sum += loss.detach().double()
            return loss / self.accum
        if deferred:  # scaled by 1 / N in finish(), once every count is in
            self._deferred_count += n.to(self.device)
            self._sum += loss.detach().double()
            return loss * self.group_size
        if self.counts is None:
            raise ValueError("train.loss_norm = 'tokens' needs each micro-batch's valid-token count: pass a dict "
                             "batch with 'labels' (-100 = ignored) or 'loss_mask', or a loss_fn returning "
                             "(loss_sum, n_tokens)")
        total = self.total()
        if self.hf_num_items:  # the model already returned S / N
            self._sum += loss.detach().double() * total
            return loss * self.group_size
        count = self.counts[index]
        if count == 0:  # the empty mean is NaN; weight 0 keeps it out of the values and gradients
            return loss * 0.0
        self._sum += loss.detach().double() * count
        return loss * (count * self.group_size / total)

    def finish(self) -> float:
        """After the last micro-batch: the factor the reduced gradients must still be scaled by."""
        if self.mode == "tokens" and self._deferred:
            if self._handle is not None:  # the up-front count (labels) is superseded by loss_fn's n
                self._handle.wait()
                self._handle = None
            buf = self._deferred_count.reshape(1).clone()
            self.comm.all_reduce(buf, self.level)
            self._total = int(buf.item())
            self._check_total()
            return 1.0 / self._total
        return 1.0

    def local_loss(self) -> torch.Tensor:
        """This rank's share of the step loss (float64): its mean over the group's ranks is the loss."""
        if self.mode == "batch":
            return self._sum / self.accum
        return self._sum * self.group_size / self.total()
