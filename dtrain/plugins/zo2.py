"""The ``zo2`` step strategy: zeroth-order fine-tuning (MeZO-SGD) with the seed trick made exact,
data-parallel with only the two losses exchanged per step, and optional block streaming (ZO2).

One step (docs/zo2.md has the full RNG contract, which runs compare across implementations by):

    seed_k = zo2.seed * 1_000_003 + k; z = randn(p.shape, float32) from a CPU generator seeded
    with seed_k, drawn in model.named_parameters() order (trainable, each tied tensor once)
    theta+ = theta + eps z -> L+ ;  theta- = theta+ - 2 eps z -> L- ;  theta restored exactly
    g = mean over ranks of (L+ - L-) / (2 eps)
    theta <- theta - lr (g z + wd theta)     (wd only on parameters with >= 2 dimensions)

The restore is exact: dtrain never relies on theta + eps z - 2 eps z + eps z == theta (it is not,
in fp16 badly and in fp32 by an ulp here and there: MeZO issue #42). With ``stream = "off"`` the
parameters are perturbed in place and copied back from a saved copy; when streaming, a block's
perturbed values live in a working copy and the stored block is never perturbed.

``stream = "off"`` keeps everything on the device (MeZO's memory: parameters plus one copy).
``"host"``/``"nvme"`` stream the transformer blocks (:mod:`dtrain.plugins.zo2_stream`): one pass
over the blocks per step runs both perturbed forwards block by block and applies the previous
step's update to each block as it passes, so its parameters are bit-identical to ``"off"``.

Layout: zo2 needs ``zero.stage = 0``; the ``ddp`` layout holds the resident parameters and a
placeholder SGD (never stepped) whose ``lr`` starts at ``zo2.lr``, so an LR scheduler passed to
``dtrain.wrap`` drives zo2's learning rate. Nothing is all-reduced but the two losses (16 bytes).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from dtrain.config import Config, ConfigError
from dtrain.plugins.base import OptimizerFactory, register
from dtrain.plugins.step import StepOutcome, StepStrategy
from dtrain.plugins.zo2_config import ZO2Config

SEED_STRIDE = 1_000_003


def step_seed(seed: int, step: int) -> int:
    """The contract's seed of step ``step``."""
    return seed * SEED_STRIDE + step


def generator(seed: int, step: int) -> torch.Generator:
    """A fresh CPU generator for one pass of step ``step`` (re-created for every pass)."""
    return torch.Generator(device="cpu").manual_seed(step_seed(seed, step))


def draw(shape: torch.Size, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """The next z of the contract, on ``device``."""
    z = torch.randn(shape, generator=gen, dtype=torch.float32)
    return z if device.type == "cpu" else z.to(device, non_blocking=True)


def decays(p: torch.Tensor) -> bool:
    """The weight-decay rule: matrices and embeddings decay; 1-D tensors (biases, norm weights) never."""
    return p.ndim >= 2


def zo_update_(theta: torch.Tensor, z: torch.Tensor, grad: float, lr: float, wd: float) -> None:
    """theta <- theta - lr * (grad * z + wd * theta), in place (``z`` is consumed)."""
    step = z.mul_(grad)
    if wd:
        step.add_(theta, alpha=wd)
    theta.sub_(step, alpha=lr)


@register
class ZO2Plugin(StepStrategy):
    """MeZO-SGD step; see the module docstring."""

    name = "zo2"
    Config = ZO2Config
    can_clip: ClassVar[bool] = False
    needs_grads: ClassVar[bool] = False
    global_state: ClassVar[bool] = True

    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        if config.zero.stage != 0:
            raise ConfigError(f"zero.stage = {config.zero.stage} cannot be used with zo2.enabled = true: zo2 has no "
                              f"gradients or optimizer state to shard (stages 1-3) and keeps whole parameters on "
                              f"every rank; set zero.stage = 0")

    def setup(self, engine) -> None:
        super().setup(engine)
        self.cfg: ZO2Config = engine.config.zo2
        self.named = [(n, p) for n, p in engine.model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing for zo2 to train")
        self.pending: dict[str, Any] | None = None
        """The update of the last step not yet applied to the streamed blocks (stream != off)."""
        self._last: dict[str, float] = {}
        self.stream = None
        if self.cfg.stream != "off":
            from dtrain.plugins.zo2_stream import BlockStream

            self.stream = BlockStream(self, engine)

    def optimizer_factory(self, factory: OptimizerFactory | None) -> OptimizerFactory:
        if factory is not None:
            raise ConfigError("dtrain.wrap(..., optimizer=<factory>) with zo2.enabled = true: zo2 updates the "
                              "parameters itself and would ignore the optimizer; pass optimizer=None and set "
                              "zo2.lr (and zo2.weight_decay)")
        lr = self.cfg.lr
        return lambda params: torch.optim.SGD(params, lr=lr)

    # ------------------------------------------------------------------ step
    def lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def run(self, micro_batches: list[Any]) -> StepOutcome:
        engine = self.engine
        engine.model.eval()  # MeZO's convention: no dropout, so both forwards see the same function
        engine.before_update()
        if self.stream is None:
            if self.pending is not None:
                raise RuntimeError("zo2: this state carries a deferred block update from a streamed run "
                                   "(zo2.stream = host/nvme); resume it with the same zo2.stream")
            plus, minus = self._step_in_memory(micro_batches)
        else:
            plus, minus = self.stream.step(micro_batches)
        return StepOutcome(loss=(plus + minus) / 2)

    def forward_all(self, micro_batches: list[Any]) -> torch.Tensor:
        """This rank's loss share over ``micro_batches`` at the current parameter values."""
        losses = self.engine.step_loss(micro_batches)
        with torch.no_grad():
            for i, micro in enumerate(micro_batches):
                self.engine.forward_objective(micro, i, losses)
        return losses.local_loss()

    def projected_grad(self, plus: torch.Tensor, minus: torch.Tensor) -> float:
        """g = mean over ranks of (L+ - L-) / (2 eps): one all-reduce of the two losses (16 bytes)."""
        engine = self.engine
        pair = torch.stack([plus.detach().double().reshape(()), minus.detach().double().reshape(())])
        engine.comm.all_reduce(pair, engine.dp_level)
        lp, lm = (pair / engine.comm.size(engine.dp_level)).tolist()
        grad = (lp - lm) / (2 * self.cfg.eps)
        self._last = {"zo2_loss_plus": lp, "zo2_loss_minus": lm, "zo2_projected_grad": grad}
        return grad

    @torch.no_grad()
    def _step_in_memory(self, micro_batches: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        seed, step, eps, device = self.cfg.seed, self.engine.step, self.cfg.eps, self.engine.device
        params = [p for _, p in self.named]
        saved = [p.detach().clone() for p in params]
        gen = generator(seed, step)
        for p in params:
            p.add_(draw(p.shape, gen, device), alpha=eps)
        plus = self.forward_all(micro_batches)
        gen = generator(seed, step)
        for p in params:
            p.add_(draw(p.shape, gen, device), alpha=-2 * eps)
        minus = self.forward_all(micro_batches)
        for p, s in zip(params, saved):  # exact restore (not + eps z: MeZO #42)
            p.copy_(s)
        del saved
        grad, lr, wd = self.projected_grad(plus, minus), self.lr(), self.cfg.weight_decay
        gen = generator(seed, step)
        for p in params:
            zo_update_(p, draw(p.shape, gen, device), grad, lr, wd if decays(p) else 0.0)
        return plus, minus

    # ------------------------------------------------------------- state
    def settle(self) -> None:
        if self.stream is not None and self.pending is not None:
            self.engine.before_update()
            self.stream.flush()

    def metrics(self) -> dict[str, float]:
        out = dict(self._last)
        if self.stream is not None:
            out.update(self.stream.metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        """The parameters and the step are the state (z is regenerated); a streamed run may also
        carry the last step's deferred block update: its projected gradient, step and lr."""
        p = self.pending or {}
        return {"pending_grad": p.get("grad"), "pending_step": p.get("step"), "pending_lr": p.get("lr")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pending_grad") is None:
            self.pending = None
            return
        self.pending = {"grad": float(state["pending_grad"]), "step": int(state["pending_step"]),
                        "lr": float(state["pending_lr"]), "first_state": None}

    def teardown(self) -> None:
        if self.stream is not None:
            self.stream.close()
