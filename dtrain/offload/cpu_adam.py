"""``offload.cpu_adam = true``: DeepSpeed's ``DeepSpeedCPUAdam`` steps the offloaded state in place
of the user's ``torch.optim.Adam``/``AdamW`` (docs/offload.md).

:func:`cpu_adam_factory` wraps the optimizer factory: it builds the user's optimizer, checks it is
plain Adam or AdamW (no AMSGrad, no ``maximize``), and returns a :class:`DeepSpeedCPUAdam` over
the same param groups with the same hyperparameters (Adam or AdamW mode from the optimizer's
type). The layouts rebuild the optimizer on their shards as ``type(optimizer)(param_groups)``,
so the mode travels in each param group (``adamw_mode``).

The subclass keeps the state in torch's form, a float32 0-dim ``step`` tensor beside the
``exp_avg``/``exp_avg_sq`` tensors, so checkpoints of a ``cpu_adam`` run and of a torch Adam(W)
run load into each other; each step still calls DeepSpeed's vectorised ``adam_update`` kernel.
It is not bit-identical to torch (another order of float32 operations, float32 bias correction):
tests/dist/test_offload.py states the tolerance.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from dtrain.errors import UsageError

_CLASS: type | None = None


def cpu_adam_class() -> type:
    """The DeepSpeedCPUAdam subclass (imports deepspeed and loads its ``cpu_adam`` op; a failure is
    one UsageError line)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()
    except Exception as exc:  # noqa: BLE001 - ImportError, a compiler error, a missing toolchain
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"offload.cpu_adam = true, but DeepSpeed's cpu_adam op does not load here "
                         f"({type(exc).__name__}: {first}); install deepspeed with a C++ compiler "
                         f"(pip install deepspeed), or set offload.cpu_adam = false to step with the "
                         f"user's optimizer") from None

    class CPUAdam(DeepSpeedCPUAdam):
        """DeepSpeedCPUAdam whose state has torch's form (see the module docstring)."""

        def __init__(self, params: Any, adamw_mode: bool | None = None) -> None:
            # DeepSpeedCPUAdam.__init__'s work without its CPU-vendor query (py-cpuinfo, ~2 s a call,
            # for an fp16-on-AMD warning that fp32 state never needs); the layouts build it twice.
            params = list(params)
            if adamw_mode is None:
                adamw_mode = next((g["adamw_mode"] for g in params if isinstance(g, dict) and "adamw_mode" in g), True)
            defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True,
                            amsgrad=False, adamw_mode=adamw_mode)
            torch.optim.Optimizer.__init__(self, params, defaults)
            self.adam_w_mode, self.fp32_optimizer_states = adamw_mode, True
            self.opt_id = DeepSpeedCPUAdam.optimizer_id
            DeepSpeedCPUAdam.optimizer_id += 1
            self.ds_opt_adam = CPUAdamBuilder().load()
            d = self.defaults
            self.ds_opt_adam.create_adam(self.opt_id, d["lr"], d["betas"][0], d["betas"][1], d["eps"],
                                         d["weight_decay"], adamw_mode, False)
            for group in self.param_groups:
                group["adamw_mode"] = adamw_mode

        @torch.no_grad()
        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if "exp_avg" not in state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    if not torch.is_tensor(state["step"]):
                        state["step"] = torch.tensor(float(state["step"]))
                    state["step"] += 1
                    self.ds_opt_adam.adam_update(self.opt_id, int(state["step"].item()), float(group["lr"]), beta1,
                                                 beta2, group["eps"], group["weight_decay"], group["bias_correction"],
                                                 p.data, p.grad.data, state["exp_avg"], state["exp_avg_sq"])
            return loss

    _CLASS = CPUAdam
    return CPUAdam


def to_cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A DeepSpeedCPUAdam over ``optimizer``'s param groups and hyperparameters (a fresh
    torch Adam or AdamW); anything else is one UsageError line."""
    kind = type(optimizer)
    if kind not in (torch.optim.Adam, torch.optim.AdamW):
        raise UsageError(f"offload.cpu_adam = true replaces torch.optim.Adam or AdamW, but the optimizer "
                         f"factory returned {kind.__module__}.{kind.__name__}; return Adam/AdamW from it or "
                         f"set offload.cpu_adam = false")
    for gi, group in enumerate(optimizer.param_groups):
        for key in ("amsgrad", "maximize"):
            if group.get(key):
                raise UsageError(f"offload.cpu_adam = true: param group {gi} sets {key} = True, which "
                                 f"DeepSpeedCPUAdam does not implement; drop it or set offload.cpu_adam = false")
    adamw = kind is torch.optim.AdamW or bool(optimizer.param_groups[0].get("decoupled_weight_decay", False))
    cls = cpu_adam_class()
    groups = [{k: (float(v) if k == "lr" else v) for k, v in g.items()} for g in optimizer.param_groups]
    return cls(groups, adamw_mode=adamw)


def cpu_adam_factory(factory: Callable[..., torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    """``factory`` with its optimizer replaced by :func:`to_cpu_adam` (same signature, so a factory
    taking ``named`` parameters still gets them)."""

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return to_cpu_adam(factory(*args, **kwargs))

    return build


def describe(optimizer: torch.optim.Optimizer) -> str:
    """Which optimizer steps the state, for the log line and docs."""
    if _CLASS is not None and isinstance(optimizer, _CLASS):
        import deepspeed

        mode = "AdamW" if optimizer.param_groups[0].get("adamw_mode", True) else "Adam"
        return f"DeepSpeedCPUAdam ({mode} mode, deepspeed {deepspeed.__version__} cpu_adam op)"
    return f"{type(optimizer).__module__}.{type(optimizer).__name__} (the factory's optimizer)"
