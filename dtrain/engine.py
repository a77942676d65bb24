"""The common trainer: one ``train_step`` skeleton that every plugin plugs into.

    split batch into micro-batches -> step strategy (dtrain/plugins/step.py; the default:
    per micro-batch plugins.before_forward -> forward (autocast) -> backward (the layout reduces
    gradients as they land) -> layout.finish_backward; then global-norm clipping across shards
    -> layout.optimizer_step) -> LR scheduler -> plugins.after_step -> checkpoint -> metrics

The engine owns the RNG seeding, the step counter, the scheduler, the metrics stream and
checkpoints; the step strategy owns turning micro-batches into an update; the layout plugin owns
where parameters, gradients and optimizer state live; dtrain/loss.py owns loss normalisation.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from dtrain.checkpoint import save_leftovers
from dtrain.config import Config
from dtrain.data import DataSlot
from dtrain.faults import FaultInjector, last_fault
from dtrain.loss import LossFn, StepLoss, is_hf_causal_lm, model_loss, takes_num_items_in_batch
from dtrain.metrics import MetricsWriter, param_sha256, peak_rss_bytes
from dtrain.plugins.base import LayoutPlugin, OptimizerFactory, Plugin, enabled_plugins, plugin_class
from dtrain.plugins.step import FirstOrderStep, StepStrategy
from dtrain.plugins.zero import layout_name
from dtrain.runtime import Runtime

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


_TIERS = ("device", "host", "nvme")
_KINDS = ("params", "grads", "optim")


class Engine:
    """A wrapped model: ``train_step``, ``eval_step``, ``save``/``load``, metrics."""

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory | None, config: Config, runtime: Runtime,
                 loss_fn: LossFn | None = None, scheduler: SchedulerFactory | None = None,
                 total_steps: int | None = None) -> None:
        self.config, self.runtime, self.loss_fn = config, runtime, loss_fn
        self.comm, self.device = runtime.comm, runtime.device
        seed_rngs(config.train.seed, runtime.rank)  # a resumed run's restored RNG state replaces it
        self.model = model.to(self.device)
        self.hf_causal_lm = loss_fn is None and is_hf_causal_lm(model)
        self.hf_num_items = self.hf_causal_lm and takes_num_items_in_batch(model)
        self.step = 0
        self.loss_level = "global"
        """Over whom ``train_step``'s loss is averaged; a plugin whose workers train separate
        replicas (co2) narrows it to the worker (``node`` or ``rank``), and the global figures
        of each step are then reduced in the background (``_record_deferred``)."""
        self._deferred: tuple | None = None
        self.layout: LayoutPlugin = plugin_class(layout_name(config.zero.stage))()  # type: ignore[assignment]
        chosen = enabled_plugins(config)
        for cls in chosen:
            if issubclass(cls, StepStrategy):
                cls.check_config(config)
        self.data = DataSlot()  # the attached dtrain.data loader's position, saved with the state
        self.plugins: list[Plugin] = [self.layout, *(cls() for cls in chosen), self.data]
        self.strategy: StepStrategy = next((p for p in self.plugins if isinstance(p, StepStrategy)),
                                           None) or FirstOrderStep()
        """The step slot's occupant, or the default first-order strategy (not in ``plugins``)."""
        for plugin in self.plugins:
            plugin.setup(self)
        if self.strategy not in self.plugins:
            self.strategy.setup(self)
        self.layout.allocate_grads = self.strategy.needs_grads
        self.layout.wrap_model(self.model, self.strategy.optimizer_factory(optimizer))
        self.optimizer = self.layout.optimizer
        self.scheduler = scheduler(self.optimizer) if scheduler else None
        metrics_path = config.metrics.path or runtime.env.metrics_path
        self.metrics = MetricsWriter(metrics_path, runtime.rank,
                                     config.metrics.progress or runtime.env.progress, total_steps,
                                     config=config, world_size=runtime.world_size)
        self.total_steps = total_steps
        self.restarts = runtime.env.restart_count
        self._totals = {"tokens": 0.0, "time_s": 0.0}
        self._comm_seen: dict[str, int] = {}
        self._closed = False
        self.faults = FaultInjector(runtime.env.inject, self) if runtime.env.inject else None
        self._resume()

    def _resume(self) -> None:
        """Continue from the newest saved state: a resilience plugin's, else ``checkpoint.dir``."""
        started = time.time()
        source = next((how for how in (p.restore() for p in self.plugins) if how), None)
        directory = self._usable_checkpoint(self.config.checkpoint.dir) if source is None else None
        if directory is not None:
            self.load(str(directory), verified=True)
            source = f"checkpoint {directory}"
        if self.runtime.rank == 0 and source:
            print(f"dtrain: resumed at step {self.step} from {source}", file=sys.stderr)
        if self.restarts:
            self._restart_event(source, started)

    def _usable_checkpoint(self, root: str | None) -> Path | None:
        """The newest complete checkpoint under ``root`` whose files all pass their size and CRC
        checks (collective); a damaged one is skipped with one line saying so."""
        from dtrain.checkpoint import CheckpointError, verify

        candidates = checkpoints_newest_first(root) if root else []
        for i, directory in enumerate(candidates):
            problem = verify(directory, self.comm)
            if problem is None:
                return directory
            if self.runtime.rank == 0:
                then = (f"falling back to {candidates[i + 1]}" if i + 1 < len(candidates)
                        else "no older complete checkpoint is left")
                print(f"dtrain: skipping damaged checkpoint: {problem}; {then}", file=sys.stderr)
        if candidates:
            raise CheckpointError(f"every complete checkpoint under {root} is damaged (see above); move "
                                  f"them aside to start from scratch, or restore them from a copy")
        return None

    def _restart_event(self, source: str | None, started: float) -> None:
        """One metrics event per restart: its cause, how long recovery took, the step resumed from."""
        env = self.runtime.env
        cause, noticed_at, failed_at = env.restart_cause, env.failure_time, env.failure_time
        fault = last_fault(self.faults.run) if self.faults is not None else None
        if fault is not None and fault["attempt"] == self.restarts - 1:
            injected = f"injected {fault['spec']} (rank {fault['rank']}, after step {fault['step']})"
            cause = f"{cause}: {injected}" if cause else injected
            failed_at = fault["time"]  # the failure itself, not when the launcher noticed it
        now = time.time()
        since = (lambda t: t - failed_at if failed_at and t else None)
        self.metrics.write({"event": "restart", "attempt": self.restarts, "cause": cause or "unknown",
                            "resumed_from_step": self.step, "source": source or "start (nothing saved)",
                            "recovery_s": since(now), "noticed_s": since(noticed_at),
                            "restore_s": now - started})

    def attach(self, loader: Any) -> Any:
        """Attach a ``dtrain.data`` loader: its position joins checkpoints and snapshots (and is
        restored now if this engine resumed)."""
        return self.data.attach(loader)

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: Any) -> torch.Tensor:
        """One optimizer step on ``batch`` (this rank's part of the global batch), made by the step
        strategy; returns the step's loss (``train.loss_norm``: the mean over the data-parallel group)."""
        self.model.train()
        start = time.perf_counter()
        parts = self.config.train.grad_accum
        split = next((s for s in (p.split_batch(batch, parts) for p in self.plugins) if s is not None), None)
        micro_batches, tokens = split if split is not None else (_split(batch, parts), None)
        outcome = self.strategy.run(micro_batches)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        for plugin in self.plugins:
            plugin.after_step(self.step)
        if self.faults is not None:
            self.faults.after_step(self.step)
        every = self.config.checkpoint.every
        if every and self.step % every == 0:
            self._periodic_checkpoint()
        tokens = _count_tokens(batch) if tokens is None else tokens
        return self._record(outcome.loss, tokens, time.perf_counter() - start, outcome.grad_norm)

    # ------------------------------------------- what step strategies call
    def step_loss(self, micro_batches: list[Any]) -> StepLoss:
        """The loss normalisation of one step over ``micro_batches`` (dtrain/loss.py); under
        ``train.loss_norm = "tokens"`` this starts the all-reduce of the valid-token counts."""
        return StepLoss(self.config.train.loss_norm, micro_batches, self.comm, self.dp_level, self.device,
                        hf_causal=self.hf_causal_lm, hf_num_items=self.hf_num_items)

    @property
    def dp_level(self) -> str:
        """The group the layout averages gradients over (``global``; a co2 worker's ``node`` or ``rank``)."""
        return getattr(self.layout, "level", "global")

    def forward_objective(self, micro: Any, index: int, losses: StepLoss) -> torch.Tensor:
        """Forward micro-batch ``index`` (plugins' ``before_forward``, autocast) and return its
        normalised share of the step's objective: the tensor to differentiate. Runs under the
        caller's grad mode (a forward-only strategy calls it inside ``torch.no_grad()``)."""
        for plugin in self.plugins:
            micro = plugin.before_forward(micro)
        extra = losses.model_kwargs(index)
        with self._autocast():
            output = self._forward(micro, extra)
            loss, n = model_loss(output, micro, self.loss_fn)
        return losses.objective(index, loss, n)

    def _forward(self, batch: Any, extra: dict[str, Any] | None = None) -> Any:
        """How a batch reaches the model: a dict as keyword arguments; with a ``loss_fn``, a tuple
        or list ``(inputs..., target)`` as its inputs (the target is for ``loss_fn(output,
        batch)``); anything else as the one argument."""
        if isinstance(batch, dict):
            return self.model(**batch, **(extra or {}))
        if self.loss_fn is not None and isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return self.model(*batch[:-1])
        return self.model(batch)

    def before_update(self) -> None:
        """Plugins' ``before_update``: a strategy calls it before it first changes the trained
        state in place in a step (the optimizer step, or its own update)."""
        for plugin in self.plugins:
            plugin.before_update()

    @torch.no_grad()
    def eval_step(self, batch: Any) -> torch.Tensor:
        """Forward only; returns the loss averaged over ranks."""
        self.strategy.settle()
        self.model.eval()
        with self._autocast():
            loss, n = model_loss(self._forward(batch), batch, self.loss_fn)
        if n is not None:
            loss = loss / n.clamp(min=1)
        total = loss.detach().double().reshape(1)
        self.comm.all_reduce(total)
        return (total / self.runtime.world_size).squeeze(0).float()

    def _autocast(self):
        if self.config.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---------------------------------------------------------------- metrics
    def state_bytes(self) -> dict[str, int]:
        return self.layout.state_bytes()

    def _record(self, local_loss: torch.Tensor, tokens: int, step_time: float,
                grad_norm: float | None) -> torch.Tensor:
        if self.loss_level != "global":
            return self._record_deferred(local_loss, tokens, step_time, grad_norm)
        sums = torch.tensor([float(local_loss), float(tokens)], dtype=torch.float64, device=self.device)
        self.comm.all_reduce(sums)
        loss = sums[0] / self.runtime.world_size
        if not self._wants_metrics():
            return loss.float()
        maxes = torch.tensor(self._local_stats(step_time), dtype=torch.float64, device=self.device)
        self.comm.all_reduce(maxes, op=torch.distributed.ReduceOp.MAX)
        self._write_record(self.step, float(sums[0]), float(sums[1]), maxes.tolist(), grad_norm,
                           self._plugin_metrics())
        return loss.float()

    def _record_deferred(self, local_loss: torch.Tensor, tokens: int, step_time: float,
                         grad_norm: float | None) -> torch.Tensor:
        """Workers train separate replicas between outer syncs (co2 sets ``loss_level``): the loss
        returned is this worker's mean, and the step's global figures travel in one asynchronous
        all-gather whose record is written at the next step, so no step waits on the inter-node
        link (where a 16-byte collective queues behind the outer sync's bytes)."""
        loss = local_loss.detach().double().reshape(1).clone()
        if self.loss_level != "rank":
            self.comm.all_reduce(loss, self.loss_level)
            loss /= self.comm.size(self.loss_level)
        self._finish_deferred()
        if self._wants_metrics():
            mine = torch.tensor([float(local_loss), float(tokens), *self._local_stats(step_time)],
                                dtype=torch.float64, device=self.device)
            gathered = torch.empty(self.runtime.world_size * mine.numel(), dtype=mine.dtype, device=self.device)
            handle = self.comm.all_gather(gathered, mine, async_op=True)
            self._deferred = (handle, gathered, mine.numel(), self.step, grad_norm, self._plugin_metrics())
        return loss.float()[0]

    def _finish_deferred(self) -> None:
        """Write the record of the step whose global figures are still in flight, if any."""
        if self._deferred is None:
            return
        handle, gathered, width, step, grad_norm, plugins = self._deferred
        self._deferred = None
        handle.wait()
        rows = gathered.view(-1, width)
        sums, maxes = rows[:, :2].sum(0), rows[:, 2:].max(0).values
        self._write_record(step, float(sums[0]), float(sums[1]), maxes.tolist(), grad_norm, plugins)

    def _local_stats(self, step_time: float) -> list[float]:
        """This rank's figures that the record takes the maximum of over ranks."""
        levels = [name for name, _ in self.comm.topology.shape.levels]
        sent = [self.comm.bytes_sent.get(lvl, 0) - self._comm_seen.get(lvl, 0) for lvl in levels]
        self._comm_seen = dict(self.comm.bytes_sent)
        tiers = self.layout.state_bytes_by_tier()
        held = [tiers.get(tier, {}).get(kind, 0) for tier in _TIERS for kind in _KINDS]
        return [peak_rss_bytes(), step_time, *held, *sent]

    def _plugin_metrics(self) -> dict[str, Any]:
        return {k: v for p in self.plugins for k, v in p.metrics().items()}

    def _write_record(self, step: int, loss_sum: float, tokens: float, maxes: list[float],
                      grad_norm: float | None, plugins: dict[str, Any]) -> None:
        levels = [name for name, _ in self.comm.topology.shape.levels]
        step_time = maxes[1]
        held = iter(int(v) for v in maxes[2:2 + len(_TIERS) * len(_KINDS)])
        by_tier = {tier: {kind: next(held) for kind in _KINDS} for tier in _TIERS}
        self._totals["tokens"] += tokens
        self._totals["time_s"] += step_time
        record = {
            "step": step, "loss": loss_sum / self.runtime.world_size, "step_time_s": step_time,
            "tokens_per_s": tokens / step_time if step_time > 0 else 0.0,
            "peak_rss_bytes": int(maxes[0]),
            "state_bytes": {kind: sum(by_tier[t][kind] for t in _TIERS) for kind in _KINDS},
            "state_bytes_tier": {t: kinds for t, kinds in by_tier.items() if any(kinds.values())},
            "comm_bytes": {lvl: int(v) for lvl, v in zip(levels, maxes[2 + len(_TIERS) * len(_KINDS):])},
            "restarts": self.restarts,
            "plugins": plugins,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.metrics.write(record)

    def _comm_bytes_total(self) -> dict[str, int]:
        """Per level, the most bytes any rank sent in this attempt (collective). Summing the step
        records' ``comm_bytes`` instead overcounts when the busiest rank differs between steps
        (co2's deferred records): docs/metrics.md."""
        levels = [name for name, _ in self.comm.topology.shape.levels]
        mine = torch.tensor([float(self.comm.bytes_sent.get(lvl, 0)) for lvl in levels],
                            dtype=torch.float64, device=self.device)  # read before this reduction counts
        self.comm.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
        return {lvl: int(v) for lvl, v in zip(levels, mine.tolist())}

    def _wants_metrics(self) -> bool:
        # Every rank must take the same branch: the decision may not depend on rank-0-only state.
        return bool(self.config.metrics.path or self.runtime.env.metrics_path or self.config.metrics.tensorboard
                    or self.config.metrics.progress or self.runtime.env.progress)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 parameters by name (collective: call on every rank)."""
        self.strategy.settle()
        return self.layout.full_parameters()

    def param_sha256(self) -> str:
        return param_sha256(self.full_parameters())

    def close(self) -> dict[str, Any]:
        """Finish the run: write the summary line (with ``param_sha256``) and close the stream."""
        if self._closed:
            return {}
        self._closed = True
        self._finish_deferred()
        comm_total = self._comm_bytes_total()
        summary = {"summary": True, "steps": self.step, "tokens": int(self._totals["tokens"]),
                   "time_s": self._totals["time_s"], "restarts": self.restarts,
                   "param_sha256": self.param_sha256(),
                   "comm_bytes_total": comm_total}
        self.metrics.write(summary)
        self.metrics.close()
        for plugin in self.plugins:
            plugin.teardown()
        return summary

    # ------------------------------------------------------------- checkpoints
    def _periodic_checkpoint(self) -> None:
        """``checkpoint.dir/step-N``; the previous complete one stays until this one is complete,
        so a failure during a save never leaves the run without a checkpoint to resume from."""
        root = Path(self.config.checkpoint.dir)
        self.save(str(root / f"step-{self.step:09d}"))
        if self.runtime.rank == 0:
            import shutil

            for old in _complete_checkpoints(root)[:-2]:  # with what a crashed save of it left
                base = root / old.name.split(".", 1)[0]
                for leftover in (base, *save_leftovers(base)):
                    shutil.rmtree(leftover, ignore_errors=True)

    def save(self, directory: str) -> None:
        from dtrain.checkpoint import save

        self.strategy.settle()
        save(self, directory)

    def load(self, directory: str, verified: bool = False) -> None:
        """Restore from a checkpoint directory (collective); ``verified``: its files already
        passed :func:`dtrain.checkpoint.verify`."""
        from dtrain.checkpoint import load

        self.before_update()
        load(self, directory, verified=verified)


def derived_seed(seed: int, rank: int) -> int:
    """The 63-bit seed of rank ``rank`` under ``train.seed = seed``: a stable hash of both, so
    every rank draws its own streams and (seed, rank) always gives the same ones."""
    digest = hashlib.sha256(f"dtrain train.seed={seed} rank={rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_rngs(seed: int, rank: int) -> None:
    """Seed torch (CPU and every CUDA device), python's ``random`` and numpy's global RNG."""
    value = derived_seed(seed, rank)
    torch.manual_seed(value)
    random.seed(value)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(value % 2**32)


_STEP_DIR = re.compile(r"step-\d+")


def _complete_checkpoints(root: Path) -> list[Path]:
    """``root``'s complete ``step-N`` checkpoints, oldest first (see :func:`_complete_at`)."""
    names = {d.name.split(".", 1)[0] for d in root.glob("step-*")}
    found = (_complete_at(root / name) for name in names if _STEP_DIR.fullmatch(name))
    return sorted((d for d in found if d is not None), key=lambda d: d.name.split(".", 1)[0])


def _complete_at(path: Path) -> Path | None:
    """The complete checkpoint saved as ``path``: ``path`` itself, else what a save interrupted by a
    crash left next to it (docs/layouts.md): the old checkpoint moved aside (``<path>.old-<id>``)
    or the new one not yet renamed (``<path>.tmp-<id>``, complete once its ``meta.json`` exists),
    the higher step first."""
    if (path / "meta.json").is_file():
        return path
    left = [d for d in save_leftovers(path) if (d / "meta.json").is_file()]
    return max(left, key=_saved_step, default=None)


def _saved_step(path: Path) -> int:
    try:
        return int(json.loads((path / "meta.json").read_bytes()).get("step", -1))
    except (OSError, ValueError, AttributeError):
        return -1


def checkpoints_newest_first(directory: str) -> list[Path]:
    """The checkpoints to resume from, best first: ``directory`` itself if complete (or what an
    interrupted save of it left), else its complete ``step-N`` (written by ``checkpoint.every``),
    newest first."""
    root = Path(directory)
    here = _complete_at(root)
    if here is not None:
        return [here]
    return _complete_checkpoints(root)[::-1]


def _split(batch: Any, parts: int) -> list[Any]:
    if parts == 1:
        return [batch]
    if torch.is_tensor(batch):
        if batch.shape[0] % parts:
            raise ValueError(f"batch size {batch.shape[0]} is not divisible by train.grad_accum={parts}")
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        chunks = {k: _split(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in chunks.items()} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        cols = [_split(v, parts) for v in batch]
        return [type(batch)(c[i] for c in cols) for i in range(parts)]
    raise TypeError(f"cannot split a {type(batch).__name__} into micro-batches; pass tensors, dicts or tuples")


def _count_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = batch.get("input_ids", next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(batch.numel()) if torch.is_tensor(batch) else 0
