"""Step strategy ``co2``: local steps with the outer all-reduce overlapped with the next round.

CO2 (Sun et al., "CO2: Efficient Distributed Training with Full Communication-Computation
Overlap", ICLR 2024). This module owns the outer state (outer parameters, outer momentum, the
round in flight), the dedicated process group of the outer sync, and the ``outer_*`` metrics.

Why a step strategy: :class:`CO2Plugin` occupies the step slot as a subclass of
:class:`~dtrain.plugins.step.FirstOrderStep`. Its inner steps are first-order steps on the
worker's gradients, so it inherits ``run`` unchanged (clipping, ``train.loss_norm`` and gradient
accumulation work as without co2, over the worker's group); the outer step runs in ``after_step``
at round boundaries. Holding the step slot keeps it exclusive with other strategies (ZO2).

Workers and groups
------------------
With ``co2.intra_node_sync`` (default) a *worker* is a node: its ranks keep a synchronous
gradient all-reduce every step (the layout's level is set to ``node``) and the outer sync runs
over the node-peer group (ranks with the same local rank on every node). Without it every rank
is a worker (layout level ``rank``: no gradient communication at all) and the outer group is
every rank. The outer collective runs on a process group created for it alone, so it never
queues behind (or in front of) an inner collective or the engine's metric reductions in the
backend. On the wire it still shares the slow link with them, so it goes out in chunks of
``OUTER_CHUNK_BYTES``, one collective at a time: a single multi-megabyte all-reduce keeps the
link's queue full for its whole duration, and any small collective crossing the link waits tens
of milliseconds behind it. The engine's own per-step reduction of the loss and the metrics is
taken off the critical path: the plugin sets ``engine.loss_level`` to the worker's level, so
``train_step`` returns the worker's mean loss and the global figures of a step travel in an
asynchronous all-gather whose metrics record is written at the next step.

Sharding
--------
Each rank holds only its part ``[lo, hi)`` of every flat unit, split over the worker's
data-parallel group (the layout's ``level``), of the outer state, under ddp as under ZeRO-1/2:
with N ranks per node each holds 1/N of x_outer and m, and the outer all-reduce of a rank covers
only its part, so a node sends each byte across the slow link once. The plugin reads and writes
the parameters only through the layout's descriptors (``shards("master")``, ``shards("param")``,
``publish``; docs/layouts.md): after a rebase the layout publishes the updated master shards
(ZeRO), or the node's ranks all-gather their parts into the full parameters (ddp, whose master
is not split).

Equations (per rank, on its shard; G = number of workers, r = round index)
---------------------------------------------------------------------------
Inner steps: the user's optimizer, ``tau = co2.local_steps`` times per round, on the worker's
own data, gradients averaged inside the node only. At the end of round r (every tau steps) the
local parameters are y. The round's *send* is::

    a_r = y                       (anchor: the point local progress is measured from)
    s_r = sum_j y_j  (async)      (all-reduce over the G workers, started now)

The *apply* of round r happens at the end of round r+1 (``co2.overlap``, one round stale) or
right after the send (``overlap = false``: synchronous local SGD, zero staleness)::

    xbar   = s_r / G                                          (average of the workers' a_r)
    Delta  = x_outer - xbar                                   (pseudo-gradient)
    Lambda_l = 1 + ||Delta_l||_2 / (||x_outer,l||_2 + eps)    per parameter tensor l
                                                              (co2.penalty = "adaptive", default;
                                                               a reconstruction, see below)
    Lambda_l = c                                              (co2.penalty = c, a positive number:
                                                               the released code's constant)
    Lambda_l = 1                                              (co2.penalty = "off")
    m      = beta * m + Delta / Lambda
    m.clamp_(-phi, phi)                                       (IN PLACE; skipped when clip is None)
    x_outer = x_outer - alpha * m
    y      = x_outer + (y - a_r)                              (rebase, keeping the local progress
                                                               made since the send)

then round r+1's send starts from the rebased y. The first boundary (nothing in flight yet)
only sends. With ``overlap = false`` the progress ``y - a_r`` is exactly zero, so every worker
restarts from x_outer: that is SlowMo / DiLoCo-style synchronous local SGD.

Where this differs from the paper and its code, and why:

* ``co2.penalty``, decided: the paper's exact Lambda_t could not be obtained; what is established
  is that the authors' released code divides the pseudo-gradient by a constant
  ``co2_gap_penalty``. So ``co2.penalty`` is one of "off" (Lambda = 1), a positive number (that
  constant divisor, as the released code) or "adaptive" (the default: the per-tensor
  1 + ||Delta_l|| / ||x_outer,l|| below). No further search for the paper's formula is planned.
* "adaptive" is a RECONSTRUCTION, not the paper's formula. The paper (Algorithm 1) divides the
  pseudo-gradient by a staleness gap penalty Lambda_t computed from x_{t,0}, after Gap-Aware
  (Barkai et al., ICLR 2020: a stale update divided element-wise by its "gap" in units of an
  average step size); a reviewer notes that its derivation assumes a decaying inner learning
  rate. The exact expression could not be obtained while this was written, so it is not
  implemented. The authors' released code (github.com/weigao266/fairscale-CO2, file
  fairscale/experimental/nn/data_parallel/gossip/co2.py, linked from github.com/OpenNLPLab/CO2)
  uses a constant instead: ``m = beta * m + (x_old - x) / Lambda`` with Lambda the
  user-set scalar ``co2_gap_penalty`` (default 1.0). dtrain's Lambda_l is an adaptive
  Gap-Aware-style scale >= 1 built only from quantities every worker holds identically
  (x_outer and the average): with a one-round delay the gap between the stale average and the
  current outer point is Delta itself, measured relative to ||x_outer,l||. Lambda must be
  identical on every worker or x_outer would silently diverge, which rules out any term in the
  local y. The per-tensor norms of a sharded tensor are summed over the node's ranks (one tiny
  intra-node all-reduce, in float64); ``co2.penalty = "off"`` gives Lambda = 1, the released
  code's default.
* Clipping is element-wise and in place. The released code calls ``torch.clamp(m, ...)`` and
  discards the result, so its clipping does nothing; ``tests/dist/test_co2.py`` fails on that
  bug.
* The rebase keeps the local progress of the overlapped round (so no computed step is thrown
  away); the released code overwrites the local parameters with the new outer point.
* Outer state sharding: the released code shards x_old and m over its first
  ``outer_momentum_num_shards`` ranks and gathers/scatters them with reduce/broadcast; here each
  rank keeps the shard its layout already owns (ddp and ZeRO-1/2 alike), so the outer step
  needs no extra collective besides the penalty's norms.
* The inner optimizer state (e.g. AdamW moments) stays local to each worker and is never
  averaged or reset, as in the paper.

Equivalence with DDP
--------------------
With tau = 1, beta = 0, alpha = 1, penalty "off", no clip and ``overlap = false``, plain SGD as the
inner optimizer, every worker starts each step from x_outer and x_outer <- x_outer - (x_outer -
mean_j(x_outer - lr g_j)) = x_outer - lr mean_j g_j: DDP. It is equal up to rounding, not bit
for bit: DDP averages gradients and steps once, CO2 steps on each worker and averages the
parameters, then computes x_outer - (x_outer - xbar), so each parameter carries a few ulps of
difference. (With ``overlap = true`` the average arrives one round late, so CO2 is *by design*
not DDP; the asynchronous path is instead checked bit for bit against the blocking execution of
the same equations, ``CO2Plugin.blocking``.)

Checkpoints
-----------
``state_dict`` returns this rank's outer shards, momentum, anchor, the finished sum of the
round in flight (it is waited for: waiting changes timing, never values), this rank's local
parameter shard and this rank's optimizer state: workers diverge between syncs, so the layout's
own checkpoint (one copy of the parameters) is not enough to resume exactly. ``dtrain.checkpoint``
stores the dict per rank (tensors flat, so the inner optimizer state carries its shapes) and
hands it back only when the world size matches; otherwise the outer state restarts from the
loaded parameters (m = 0, nothing in flight).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dtrain.comm import Comm
from dtrain.config import ConfigError
from dtrain.plugins.base import register
from dtrain.plugins.co2_config import CO2Config
from dtrain.plugins.step import FirstOrderStep
from dtrain.topology import Topology

if TYPE_CHECKING:
    from dtrain.engine import Engine
    from dtrain.partition import UnitSpec

EPS = 1e-8
OUTER_CHUNK_BYTES = 256 * 1024


def segment_sq_norms(flat: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Float64 squared L2 norm of each consecutive segment of the 1-D ``flat``."""
    pieces = flat[:sum(lengths)].split(list(lengths))
    return torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64).square() for p in pieces])


def gap_penalty(delta_sq: torch.Tensor, outer_sq: torch.Tensor) -> torch.Tensor:
    """Lambda_l = 1 + ||Delta_l|| / (||x_outer,l|| + eps) from the squared norms of each tensor l."""
    return 1.0 + delta_sq.sqrt() / (outer_sq.sqrt() + EPS)


@dataclass(frozen=True)
class _Segments:
    """How this rank's shard ``[lo, hi)`` of a unit splits into parameter tensors.

    Slots ``first .. first + len(lengths) - 1`` of the unit overlap the shard by ``lengths``
    elements (slots are laid out back to back); ``pad`` trailing elements are padding.
    """

    first: int
    lengths: tuple[int, ...]
    pad: int

    @staticmethod
    def of(unit: Any, lo: int, hi: int) -> "_Segments":
        lengths, first = [], len(unit.slots)
        for k, s in enumerate(unit.slots):
            n = min(s.offset + s.numel, hi) - max(s.offset, lo)
            if n > 0:
                first = min(first, k)
                lengths.append(n)
        return _Segments(first, tuple(lengths), (hi - lo) - sum(lengths))


@dataclass
class _Round:
    """One outer all-reduce: the summed buffers (filled by the thread) and its timing."""

    sums: list[torch.Tensor]
    thread: threading.Thread | None = None
    started: float = 0.0
    finished: float | None = None
    error: BaseException | None = None


@register
class CO2Plugin(FirstOrderStep):
    """Local inner steps; every ``local_steps`` an outer sync overlapped with the next round."""

    name = "co2"
    Config = CO2Config  # the ``co2`` section; defined in a torch-free module for the launcher

    # ------------------------------------------------------------------ setup
    def setup(self, engine: "Engine") -> None:
        super().setup(engine)
        self.cfg = engine.config.co2
        layout = engine.layout
        if engine.config.zero.stage == 3:
            raise ConfigError("co2.enabled = true cannot be combined with zero.stage = 3; use stage 0, 1 or 2")
        layout.level = "node" if self.cfg.intra_node_sync else "rank"  # the data-parallel group
        engine.loss_level = layout.level  # a worker's own loss; no per-step wait on the slow link
        self.blocking = False  # reference execution: wait for each sync right after starting it
        # Bytes per outer collective (0: one per unit). Measured on the 100 Mbit harness (tbf,
        # 50 ms queue): a 16-byte all-reduce took 26 ms (max 48) behind one 3.3 MB all-reduce,
        # 4 ms behind 256 KiB chunks, 0.25 ms on an idle link. At 1 Gbit 64 KiB chunks tripled
        # the sync time (per-collective overhead); 256 KiB cost ~+50 %, still hidden.
        self.chunk_bytes = OUTER_CHUNK_BYTES
        self.outer = self._outer_comm(engine.comm)
        self.workers = self.outer.size(*self._outer_level())
        self._ready = False
        self._inflight: _Round | None = None
        self._step_metrics = {"outer_sync_s": 0.0, "outer_wait_s": 0.0}
        self._totals = {"outer_sync_total_s": 0.0, "outer_wait_total_s": 0.0, "outer_rounds": 0.0}

    def _outer_level(self) -> tuple[str, bool]:
        return ("node", True) if self.cfg.intra_node_sync else ("global", False)

    def _outer_comm(self, comm: Comm) -> Comm:
        """A Comm on a dedicated group, sharing the engine's byte counters (and their lock)."""
        shape = comm.topology.shape
        level, peers = self._outer_level()
        lists = shape.peers("node") if peers else [list(range(shape.world_size))]
        topology = Topology(shape)
        mine = None
        if dist.is_initialized() and shape.world_size > 1:
            for ranks in lists:  # every rank creates every group, in the same order
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if shape.rank in ranks:
                    mine = group
        topology._groups[("peer" if peers else "block", level)] = mine
        outer = Comm(topology, comm.timeout_s)
        outer.bytes_sent = comm.bytes_sent  # inter-node bytes land in comm_bytes.global
        outer._lock = comm._lock
        return outer

    # ------------------------------------------------------------ flat views
    def _ranges(self) -> list[tuple[UnitSpec, int, int]]:
        """This rank's part of every unit when split over the worker's data-parallel group."""
        level, comm = self.engine.layout.level, self.engine.comm
        parts, index = comm.size(level), comm.group_ranks(level).index(comm.rank)
        return [(u, *u.shard_range(parts, index)) for u in self.engine.layout.unit_specs()]

    def _locals(self) -> list[torch.Tensor]:
        """This rank's master values over its ranges (views: what the optimizer updates)."""
        masters = self.engine.layout.shards("master")
        return [m.view()[lo - m.lo:hi - m.lo] for m, (_, lo, hi) in zip(masters, self._ranges())]

    def _ensure_state(self) -> None:
        if self._ready:
            return
        with torch.no_grad():
            locals_ = self._locals()
            self.x_outer = [t.detach().clone() for t in locals_]
            self.momentum = [torch.zeros_like(t) for t in locals_]
            self.anchor = [t.detach().clone() for t in locals_]
        self._segments = [_Segments.of(u, lo, hi) for u, lo, hi in self._ranges()]
        self._inflight = None
        self._ready = True

    # ------------------------------------------------------------------ hooks
    def before_forward(self, batch: Any) -> Any:
        self._ensure_state()  # x_0: the parameters before the first inner step
        return batch

    def after_step(self, step: int) -> None:
        self._ensure_state()
        self._step_metrics = {"outer_sync_s": 0.0, "outer_wait_s": 0.0}
        if step % self.cfg.local_steps:
            return
        if self.cfg.overlap:
            if self._inflight is not None:
                self._apply(self._finish(self._inflight))
            self._inflight = self._send()
            if self.blocking:
                self._wait(self._inflight)
        else:
            self._apply(self._finish(self._send()))

    # -------------------------------------------------------------- the sync
    def _send(self) -> _Round:
        """Record the anchor and start summing this round's local shards over the workers."""
        with torch.no_grad():
            sums = []
            for anchor, local in zip(self.anchor, self._locals()):
                anchor.copy_(local)
                sums.append(local.detach().clone())
        rnd = _Round(sums, started=time.perf_counter())
        if self.workers == 1:
            rnd.finished = rnd.started
            return rnd
        rnd.thread = threading.Thread(target=self._sync, args=(rnd,), name="dtrain-co2-outer", daemon=True)
        rnd.thread.start()
        return rnd

    def _sync(self, rnd: _Round) -> None:
        try:
            device = rnd.sums[0].device
            if device.type == "cuda":
                torch.cuda.set_device(device)
            level, peers = self._outer_level()
            for t in rnd.sums:
                step = max(1, self.chunk_bytes // t.element_size() if self.chunk_bytes else t.numel())
                for a in range(0, t.numel(), step):
                    self.outer.all_reduce(t[a:a + step], level, peers=peers)
        except BaseException as exc:  # re-raised on the main thread by _wait
            rnd.error = exc
        rnd.finished = time.perf_counter()

    def _wait(self, rnd: _Round) -> None:
        if rnd.thread is not None:
            start = time.perf_counter()
            rnd.thread.join()
            rnd.thread = None
            waited = time.perf_counter() - start
            self._step_metrics["outer_wait_s"] += waited
            self._totals["outer_wait_total_s"] += waited
        if rnd.error is not None:
            raise rnd.error

    def _finish(self, rnd: _Round) -> list[torch.Tensor]:
        self._wait(rnd)
        sync = (rnd.finished or rnd.started) - rnd.started
        self._step_metrics["outer_sync_s"] = sync
        self._totals["outer_sync_total_s"] += sync
        self._totals["outer_rounds"] += 1
        self._inflight = None
        return [t.div_(self.workers) for t in rnd.sums]

    @torch.no_grad()
    def _apply(self, averages: list[torch.Tensor]) -> None:
        """The outer step on this rank's shards, then the rebase of the local parameters.

        Works in place: each average buffer becomes its Delta, the local shard becomes
        x_outer + (y - a_r). ``a + b == b + a`` exactly in IEEE arithmetic, so the order of the
        in-place operations does not change a bit of the result.
        """
        cfg = self.cfg
        deltas = [avg.neg_().add_(x) for x, avg in zip(self.x_outer, averages)]
        if cfg.penalty == "adaptive":
            for delta, seg, lams in zip(deltas, self._segments, self._penalty(deltas)):
                for piece, lam in zip(delta.split(list(seg.lengths) + [seg.pad]), lams):
                    piece.div_(lam)
        elif cfg.penalty != "off":
            for delta in deltas:
                delta.div_(float(cfg.penalty))
        for i, local in enumerate(self._locals()):
            m = self.momentum[i]
            m.mul_(cfg.outer_momentum).add_(deltas[i])
            if cfg.clip is not None:
                m.clamp_(-cfg.clip, cfg.clip)
            self.x_outer[i].sub_(m, alpha=cfg.outer_lr)
            local.sub_(self.anchor[i]).add_(self.x_outer[i])
        self._publish()

    def _penalty(self, deltas: list[torch.Tensor]) -> list[list[float]]:
        """Per unit, Lambda of each parameter tensor in this rank's shard (1.0 for the padding).

        The squared norms of a tensor split across the node's ranks are summed over the node
        (one small float64 all-reduce), so every rank, and every worker, uses the same Lambda.
        Each Lambda is rounded to the parameters' dtype before it divides them.
        """
        layout = self.engine.layout
        units = layout.unit_specs()
        sq = torch.zeros(2, sum(len(u.slots) for u in units), dtype=torch.float64, device=deltas[0].device)
        base = 0
        for unit, seg, delta, outer in zip(units, self._segments, deltas, self.x_outer):
            if seg.lengths:
                at = slice(base + seg.first, base + seg.first + len(seg.lengths))
                sq[0, at] = segment_sq_norms(delta, seg.lengths)
                sq[1, at] = segment_sq_norms(outer, seg.lengths)
            base += len(unit.slots)
        if self.engine.comm.size(layout.level) > 1:
            self.engine.comm.all_reduce(sq, layout.level)
        lam = gap_penalty(sq[0], sq[1]).to(deltas[0].dtype).tolist()
        out, base = [], 0
        for unit, seg in zip(units, self._segments):
            out.append(lam[base + seg.first: base + seg.first + len(seg.lengths)] + [1.0])
            base += len(unit.slots)
        return out

    def _publish(self) -> None:
        """Make every rank of the node hold the full, updated local parameters again."""
        layout, comm = self.engine.layout, self.engine.comm
        layout.publish()  # ZeRO: the master shards are exactly this plugin's parts
        if layout.placement("master")[1] > 1 or comm.size(layout.level) == 1:
            return
        # ddp: the master is the whole of the parameters; each rank updated only its part
        handles = [comm.all_gather(param.view(), local.clone(), layout.level, async_op=True)
                   for param, local in zip(layout.shards("param"), self._locals())]
        for h in handles:
            h.wait()

    def flush(self) -> None:
        """End of training: wait for the outer sync in flight, if any, and apply it, so the final
        model includes the last average (as with ``overlap = false``). Benchmarks call it inside
        their timed window so co2 and synchronous local SGD pay for the same syncs."""
        if self._inflight is not None:
            self._apply(self._finish(self._inflight))

    # --------------------------------------------------------------- reports
    def metrics(self) -> dict[str, float]:
        return {**self._step_metrics, **self._totals}

    def outer_state(self) -> dict[str, list[torch.Tensor]]:
        """This rank's outer shards (for tests and inspection)."""
        self._ensure_state()
        return {"x_outer": self.x_outer, "momentum": self.momentum, "anchor": self.anchor}

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        self._ensure_state()
        out: dict[str, Any] = {"inflight": False, "local_steps": self.cfg.local_steps}
        if self._inflight is not None:
            self._wait(self._inflight)
            out["inflight"] = True
            out["inflight_started_step"] = self.engine.step - self.engine.step % self.cfg.local_steps
        for i, local in enumerate(self._locals()):
            out[f"x_outer.{i}"] = self.x_outer[i].detach().cpu().clone()
            out[f"momentum.{i}"] = self.momentum[i].detach().cpu().clone()
            out[f"anchor.{i}"] = self.anchor[i].detach().cpu().clone()
            out[f"local.{i}"] = local.detach().cpu().clone()
            if self._inflight is not None:
                out[f"inflight.{i}"] = self._inflight.sums[i].detach().cpu().clone()
        opt = self.engine.layout.optimizer
        for g, group in enumerate(opt.param_groups):
            for p, param in enumerate(group["params"]):
                for key, value in opt.state.get(param, {}).items():
                    name = f"inner_optim.{g}.{p}.{key}"
                    out[name] = value.detach().cpu().clone() if torch.is_tensor(value) else value
                    if torch.is_tensor(value):  # checkpoints store tensors flat
                        out[f"shape.{name}"] = list(value.shape)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure_state()
        if not state:
            return
        if state.get("local_steps") != self.cfg.local_steps and state.get("inflight"):
            raise ConfigError(f"the checkpoint's co2 round in flight was started with co2.local_steps = "
                              f"{state.get('local_steps')}, this run has {self.cfg.local_steps}")
        for i, local in enumerate(self._locals()):
            dev = self.x_outer[i].device
            self.x_outer[i].copy_(state[f"x_outer.{i}"].to(dev))
            self.momentum[i].copy_(state[f"momentum.{i}"].to(dev))
            self.anchor[i].copy_(state[f"anchor.{i}"].to(dev))
            local.copy_(state[f"local.{i}"].to(dev))
        self._inflight = None
        if state.get("inflight"):
            sums = [state[f"inflight.{i}"].to(self.x_outer[i].device).clone() for i in range(len(self.x_outer))]
            self._inflight = _Round(sums, started=time.perf_counter(), finished=time.perf_counter())
        opt = self.engine.layout.optimizer
        for g, group in enumerate(opt.param_groups):
            for p, param in enumerate(group["params"]):
                prefix = f"inner_optim.{g}.{p}."
                for name, value in state.items():
                    if name.startswith(prefix):
                        key = name[len(prefix):]
                        if torch.is_tensor(value):  # 0-dim counters (Adam's step) stay on the CPU
                            value = value.reshape(state.get(f"shape.{name}", value.shape))
                            value = value.clone() if value.dim() == 0 else value.to(param.device).clone()
                        opt.state[param][key] = value
        self._publish()

    def teardown(self) -> None:
        if self._inflight is not None and self._inflight.thread is not None:
            self._inflight.thread.join(timeout=self.outer.timeout_s)
