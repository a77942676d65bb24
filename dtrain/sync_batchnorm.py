"""``nn.SyncBatchNorm`` on devices torch's implementation refuses (CPU with gloo), through ``Comm``.

torch's ``SyncBatchNorm`` raises ``ValueError`` for CPU input as soon as a process group exists
(torch 2.13: "SyncBatchNorm expected input tensor to be on GPU ..."), because its kernels
(``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``) are CUDA-only. The layout calls
:func:`use_comm_sync_batchnorm` on non-CUDA devices: every ``SyncBatchNorm`` of the model then
normalises in training mode with the statistics of the whole data-parallel batch, computed by
two differentiable all-reduces (sum and count, then the sum of squared deviations: the two-pass
variance, no cancellation), and updates its running statistics with them (unbiased variance) as
torch does. Gradients flow through the all-reduces (the backward of a sum all-reduce is a sum
all-reduce), which gives each rank the gradient of the sum of all ranks' losses with respect to
its input, the same quantity torch's CUDA kernels compute. Evaluation mode and a group of one
are plain ``batch_norm``. The group is the layout's (``process_group`` is not consulted).
"""
from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from dtrain.comm import Comm


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, comm: "Comm", level: str) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.level = comm, level
        out = tensor.detach().clone()
        comm.all_reduce(out, level)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.detach().contiguous().clone()
        ctx.comm.all_reduce(out, ctx.level)
        return out, None, None


def use_comm_sync_batchnorm(model: nn.Module, comm: "Comm", level: str) -> int:
    """Make every ``nn.SyncBatchNorm`` of ``model`` synchronise over ``comm``'s ``level`` group;
    returns how many were switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.SyncBatchNorm):
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
            module._dtrain_comm = (comm, level)
            count += 1
    return count


def _forward(self: nn.SyncBatchNorm, input: torch.Tensor) -> torch.Tensor:
    comm, level = self._dtrain_comm
    self._check_input_dim(input)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    training = self.training or (self.running_mean is None and self.running_var is None)
    if not training or comm.size(level) == 1:
        running = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if running else None, self.running_var if running else None,
                            self.weight, self.bias, training, factor, self.eps)
    dtype = input.dtype
    if dtype not in (torch.float32, torch.float64):  # statistics of half-precision input in fp32
        input = input.float()
    channels = input.shape[1]
    dims = [0, *range(2, input.dim())]
    shape = [1, channels] + [1] * (input.dim() - 2)
    count = torch.full((1,), input.numel() // max(channels, 1), dtype=input.dtype, device=input.device)
    sums = _AllReduceSum.apply(torch.cat([input.sum(dims), count]), comm, level)
    total = sums[-1].detach()
    if float(total) < 2:
        raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel over all ranks, "
                         f"got {int(total)} (input shape {tuple(input.shape)})")
    mean = sums[:channels] / total
    centred = input - mean.view(shape)
    var = _AllReduceSum.apply((centred * centred).sum(dims), comm, level) / total
    out = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.weight is not None:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    if self.training and self.track_running_stats:
        with torch.no_grad():
            unbiased = var.detach() * (total / (total - 1))
            self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
            self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
    return out.to(dtype)
