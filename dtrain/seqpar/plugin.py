"""The ``seqpar`` plugin: each step runs a FlexSP plan (docs/seqpar.md).

Every rank passes the same global batch of variable-length sequences to ``train_step`` (a list of
1-D token tensors, ``{"input_ids": packed, "lengths": ...}``, or a :class:`SeqBatch`). The plugin

1. gets the step's :class:`~dtrain.seqpar.schedule.Schedule`: a hand-written plan carried by the
   batch, else the planner's (rank 0 solves; with ``seqpar.lookahead = 1`` the solve of the next
   batch runs in a background thread while this step trains) broadcast in one collective;
2. creates the groups it has not used before (one ``new_group`` per distinct rank block, on every
   rank in the plan's order);
3. turns each micro-batch of the plan into this rank's micro-batch: its group's sequences packed
   (labels = the next token of the same sequence, -100 at each sequence's end and on padding;
   positions restart per sequence; padded to a multiple of the group size), of which this rank
   takes its contiguous slice. A rank in no group of a micro-batch gets one padding token (a
   forward with no valid label keeps every rank's collectives in step, e.g. ZeRO-3's gathers);
4. before each forward, activates the micro-batch's group for :func:`dtrain.seqpar.attention`.

The loss is normalised by the global batch's valid tokens (``train.loss_norm = "tokens"``, which
the plugin requires) and the layout reduces gradients over all ranks as usual, so the update is
the same whatever the plan (tests/dist/test_seqpar.py).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from dtrain.config import ConfigError
from dtrain.plugins.base import Plugin, register
from dtrain.seqpar import schedule as sched
from dtrain.seqpar.ulysses import SeqParContext, SeqParError, activate
from dtrain.seqpar.config import SeqParConfig


FILLS = (0.95, 1.0)
"""Memory fills the planner is run with (``PlannerOptions.memory_fill``): its default headroom, and
the whole per-rank limit (``seqpar.max_tokens_per_rank`` is a hard token count), which can save a
micro-batch."""


@dataclass
class SeqBatch:
    """A global batch for the seqpar plugin: every rank passes the same one."""

    sequences: list[torch.Tensor]
    plan: Any = None
    """Optional hand-written plan (``schedule.from_spec`` form, a Schedule or a planner StepPlan)."""
    next_lengths: list[int] | None = None
    """The next batch's lengths, so the planner can solve it while this step trains."""

    @property
    def lengths(self) -> list[int]:
        return [int(s.numel()) for s in self.sequences]


def as_seq_batch(batch: Any) -> SeqBatch | None:
    """The batch as a :class:`SeqBatch`, or None if it is not one of the accepted forms."""
    if isinstance(batch, SeqBatch):
        return batch
    if isinstance(batch, dict) and "lengths" in batch and "input_ids" in batch:
        lengths = [int(n) for n in torch.as_tensor(batch["lengths"]).reshape(-1).tolist()]
        packed = torch.as_tensor(batch["input_ids"]).reshape(-1)
        if sum(lengths) != packed.numel():
            raise SeqParError(f"seqpar: lengths sum to {sum(lengths)} but input_ids holds {packed.numel()} tokens; "
                              f"pass the lengths of the packed sequences in order")
        return SeqBatch(list(packed.split(lengths)), batch.get("plan"), batch.get("next_lengths"))
    if isinstance(batch, (list, tuple)) and batch and all(torch.is_tensor(s) and s.dim() == 1 for s in batch):
        return SeqBatch(list(batch))
    return None


def ahead(batches: Iterable[Any]) -> Iterator[SeqBatch]:
    """Yield each batch as a :class:`SeqBatch` that knows the next batch's lengths (lookahead)."""
    it = iter(batches)
    try:
        current = as_seq_batch(next(it))
    except StopIteration:
        return
    for following in it:
        nxt = as_seq_batch(following)
        yield replace(current, next_lengths=nxt.lengths)
        current = nxt
    yield current


def model_limits(model: nn.Module, override: str | None) -> tuple[Any, int | None, int | None]:
    """``(planner ModelShape or None, heads or None, max positions or None)`` of ``model``."""
    from dtrain.planner import ModelShape, PlannerError, parse_model

    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    get = (lambda *names: next((getattr(cfg, n) for n in names if isinstance(getattr(cfg, n, None), int)), None))
    layers, hidden = get("n_layer", "num_hidden_layers"), get("n_embd", "hidden_size")
    heads, vocab = get("n_head", "num_attention_heads"), get("vocab_size")
    positions = get("block_size", "n_positions", "max_position_embeddings")
    shape = None
    if override:
        try:
            shape = parse_model(override)
        except PlannerError as exc:
            raise ConfigError(f"seqpar.model: {exc}") from None
        heads = heads or shape.heads
    elif None not in (layers, hidden, heads, vocab):
        ffn = get("n_inner", "intermediate_size") or 4 * hidden
        shape = ModelShape(type(model).__name__, layers=layers, hidden=hidden, heads=heads, vocab=vocab, ffn=ffn,
                           tied_embeddings=True)
    return shape, heads, positions


@register
class SeqParPlugin(Plugin):
    """FlexSP runtime (module docstring)."""

    name = "seqpar"
    slot = "seqpar"
    Config: ClassVar[type] = SeqParConfig

    def setup(self, engine: Any) -> None:
        super().setup(engine)
        cfg = engine.config
        self.cfg: SeqParConfig = cfg.seqpar
        if cfg.train.loss_norm != "tokens":
            raise ConfigError('seqpar.enabled = true needs train.loss_norm = "tokens" (the loss is the mean over '
                              'the global batch\'s tokens, so the update does not depend on the plan); set it')
        if cfg.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum = {cfg.train.grad_accum} cannot be used with seqpar.enabled = true: "
                              f"the plan decides the micro-batches; remove train.grad_accum")
        self.rank, self.world = engine.runtime.rank, engine.runtime.world_size
        self.comm = engine.comm
        self.shape, self.heads, self.positions = model_limits(engine.model, self.cfg.model)
        self.groups_used: set[tuple[int, ...]] = set()
        self._costs: dict[int, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[tuple[int, ...], Future] | None = None
        self._schedule: sched.Schedule | None = None
        self._times: list[float] = []
        self._started = 0.0
        self._metrics: dict[str, Any] = {}
        self._solve_s = 0.0
        self._wait_s = 0.0
        self._lengths: list[int] = []
        self._samples: list[Any] = []
        self._grads_done = 0.0
        # A micro-batch's time ends with its backward's last gradient, not after the layout's
        # finish_backward: the last micro-batch's gradient reduction is a per-step cost, and
        # timing it with that micro-batch's groups would leak it into the fitted c(d).
        for param in engine.model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._grad_accumulated)

    # ------------------------------------------------------------------ planning
    def _cost(self, devices: int) -> Any:
        """The planner's cost model for ``devices`` ranks of this job (rank 0 only)."""
        if devices in self._costs:
            return self._costs[devices]
        from dtrain.planner import CostModel, PlannerError, default_cluster, load_cluster
        from dtrain.planner.cluster import GIB, REPO_CLUSTER_DIR

        if self.shape is None:
            raise ConfigError(f"seqpar: cannot read the model's shape from {type(self.engine.model).__name__}; set "
                              f"seqpar.model (e.g. 'layers=4,hidden=128,heads=4,vocab=256')")
        try:
            if self.cfg.cluster:
                cluster = load_cluster(self.cfg.cluster)
            else:
                local = REPO_CLUSTER_DIR / "cpu_local.toml"
                cluster = load_cluster(local) if local.is_file() else default_cluster()
            per_node = self.engine.comm.topology.shape.procs_per_node
            cluster = cluster.with_topology(devices, min(devices, per_node))
            cost = CostModel(self.shape, cluster)
            if self.cfg.max_tokens_per_rank is not None:
                need = cost.model_state_bytes + (self.cfg.max_tokens_per_rank + 0.01) * cost.bytes_per_token  # a hair over: float headroom, never a whole token
                cost = CostModel(self.shape, replace(cluster, memory_GiB=cluster.reserve_GiB + need / GIB))
        except PlannerError as exc:
            raise ConfigError(f"seqpar: {exc}") from None
        self._costs[devices] = cost
        return cost

    def use_cluster(self, path: str, next_lengths: Sequence[int] | None = None) -> None:
        """Plan with the cluster file ``path`` from now on (e.g. one refitted by
        :mod:`dtrain.seqpar.calibrate`): a solve already started is dropped, and with lookahead
        the solve of the next batch (``next_lengths``) starts now with the new model."""
        self.cfg.cluster = str(path)
        self._costs.clear()
        self._ahead = None
        self._start_ahead(next_lengths)

    def _largest_group(self) -> int:
        """The largest group size a plan may use: the cost model's cap (powers of two up to the
        world that divide the heads, :attr:`CostModel.max_group_size`); the same rule when the
        model's shape is unknown (hand-written plans only)."""
        if self.shape is not None:
            return self._cost(self.world).max_group_size
        from dtrain.planner.cost import power_of_two_sizes

        return max(d for d in power_of_two_sizes(self.world) if not self.heads or self.heads % d == 0)

    def check_lengths(self, lengths: Sequence[int]) -> None:
        """Refuse a sequence no group can hold (identically on every rank, before any collective)."""
        for i, n in enumerate(lengths):
            if n < 1:
                raise SeqParError(f"seqpar: sequence {i} is empty; drop it from the batch")
            if self.positions is not None and n > self.positions:
                raise SeqParError(f"seqpar: sequence {i} has {n} tokens, more than the model's {self.positions} "
                                  f"positions; split it or build the model with more positions")
        limit_tok = self.cfg.max_tokens_per_rank
        if limit_tok is not None:
            cap = self._largest_group()
            i = max(range(len(lengths)), key=lambda k: lengths[k])
            if lengths[i] > cap * limit_tok:
                raise SeqParError(f"seqpar: sequence {i} has {lengths[i]} tokens, more than the largest group can hold "
                                  f"({cap} ranks x seqpar.max_tokens_per_rank={limit_tok} = {cap * limit_tok} tokens); "
                                  f"raise seqpar.max_tokens_per_rank or split the sequence")

    def solve(self, lengths: Sequence[int]) -> tuple[sched.Schedule, float]:
        """The schedule for ``lengths`` over the whole world and the seconds it took (rank 0).

        One ``plan_step`` over the world per memory fill (the planner's default headroom, and the
        full per-rank limit), whose cost model caps the group sizes (heads, memory); then the
        candidates, with the static layouts of every allowed size, are scored by
        :func:`dtrain.seqpar.calibrate.predict_step` and the fastest kept. With a cluster refitted
        on the runtime that score includes each micro-batch's fixed cost ``c(d)``, which the
        planner's search does not see (docs/seqpar.md)."""
        from dtrain.planner import PlannerError, PlannerOptions, plan_step
        from dtrain.seqpar.calibrate import predict_step

        t0 = time.perf_counter()
        cost = self._cost(self.world)
        lengths = [int(n) for n in lengths]
        candidates, names = [], []
        for fill in FILLS:
            try:
                plan = plan_step(lengths, cost, PlannerOptions(time_limit_s=self.cfg.solver_time_s / len(FILLS),
                                                               memory_fill=fill, solver=self.cfg.solver))
            except PlannerError as exc:
                raise SeqParError(f"seqpar: {exc}") from None
            candidates.append(sched.from_step_plan(plan))
            names.append(f"planner@{fill:g}")
        room = self.cfg.max_tokens_per_rank or max(1, int(cost.tokens_per_device))
        for d in cost.group_sizes:
            try:
                candidates.append(sched.static_schedule(lengths, self.world, d, room, cost.seq_time))
                names.append(f"static-{d}")
            except SeqParError:
                continue  # a sequence does not fit a group of d

        best = min(range(len(candidates)), key=lambda k: predict_step(cost, _group_lengths(candidates[k], lengths)))
        candidates[best].source = names[best]
        return candidates[best], time.perf_counter() - t0

    def _start_ahead(self, lengths: Sequence[int] | None) -> None:
        if self.rank != 0 or not self.cfg.lookahead or lengths is None:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqpar-plan")
        self._ahead = (tuple(lengths), self._pool.submit(self.solve, list(lengths)))

    def _schedule_for(self, batch: SeqBatch) -> sched.Schedule:
        """This step's schedule, identical on every rank (one broadcast from rank 0 when planned)."""
        lengths = batch.lengths
        self.check_lengths(lengths)
        if batch.plan is not None:
            plan = batch.plan
            if isinstance(plan, sched.Schedule):
                schedule = plan
            elif hasattr(plan, "micro_batches") and hasattr(plan, "num_devices"):
                schedule = sched.from_step_plan(plan)
            else:
                schedule = sched.from_spec(plan)
            sched.check(schedule, self.world, lengths, self.heads, self.cfg.max_tokens_per_rank)
            self._solve_s = self._wait_s = 0.0
            return schedule
        buf = torch.zeros(sched.encoded_length(len(lengths)), dtype=torch.int64)
        schedule = None
        if self.rank == 0:
            t0 = time.perf_counter()
            try:
                if self._ahead is not None and self._ahead[0] == tuple(lengths):
                    schedule, self._solve_s = self._ahead[1].result()
                else:
                    schedule, self._solve_s = self.solve(lengths)
                self._wait_s = time.perf_counter() - t0
                sched.check(schedule, self.world, lengths, self.heads, self.cfg.max_tokens_per_rank)
                buf = sched.encode(schedule, len(lengths))
            except BaseException:
                buf[0] = -1  # the others raise too instead of waiting for a plan
                self.comm.broadcast(buf.to(self.engine.device), 0)
                raise
            finally:
                self._ahead = None
        dev = buf.to(self.engine.device)
        self.comm.broadcast(dev, 0)
        if self.rank != 0:
            if int(dev[0]) < 0:
                raise SeqParError("seqpar: rank 0 could not plan this batch (its error is above)")
            schedule = sched.decode(dev.cpu(), self.world)
        self._start_ahead(batch.next_lengths)
        return schedule

    # ----------------------------------------------------------------- the step
    def split_batch(self, batch: Any, parts: int) -> tuple[list[Any], int] | None:
        seq = as_seq_batch(batch)
        if seq is None:
            raise SeqParError(f"seqpar.enabled = true needs a batch of variable-length sequences (a list of 1-D "
                              f"token tensors, {{'input_ids': packed, 'lengths': ...}} or dtrain.seqpar.SeqBatch), "
                              f"not {type(batch).__name__}")
        schedule = self._schedule_for(seq)
        for ranks in schedule.ranges():  # same blocks, same order on every rank: creation is collective
            if ranks not in self.groups_used and len(ranks) < self.world:
                self.comm.topology.range_group(ranks)
            self.groups_used.add(ranks)
        self._schedule = schedule
        self._lengths = seq.lengths
        self._times = []
        micro, tokens = [], 0
        for k in range(len(schedule.micro_batches)):
            item, n = self._micro_batch(schedule.group_of(k, self.rank), seq.sequences)
            micro.append(item)
            tokens += n
        return micro, tokens

    def _micro_batch(self, group: sched.Group | None, sequences: list[torch.Tensor]) -> tuple[dict[str, Any], int]:
        device = self.engine.device
        if group is None:  # idle in this micro-batch: one padding token, no valid label
            ctx = SeqParContext(None, (self.rank,), (0, 1))
            zero = torch.zeros(1, 1, dtype=torch.long, device=device)
            return {"input_ids": zero, "labels": zero - 100, "position_ids": zero, "seqpar": ctx}, 0
        pieces = [sequences[s].reshape(-1).long() for s in group.sequences]
        ends = torch.full((1,), -100, dtype=torch.long)
        inputs = torch.cat(pieces)
        labels = torch.cat([torch.cat((p[1:], ends)) for p in pieces])
        positions = torch.cat([torch.arange(p.numel()) for p in pieces])
        bounds = [0]
        for p in pieces:
            bounds.append(bounds[-1] + p.numel())
        d, total = group.size, bounds[-1]
        pad = (-total) % d
        if pad:
            inputs = torch.cat((inputs, torch.zeros(pad, dtype=torch.long)))
            labels = torch.cat((labels, torch.full((pad,), -100, dtype=torch.long)))
            positions = torch.cat((positions, torch.arange(pad)))
            bounds.append(total + pad)
        width = (total + pad) // d
        r = group.ranks.index(self.rank)
        lo, hi = r * width, (r + 1) * width
        ctx = SeqParContext(self.comm if d > 1 else None, group.ranks, tuple(bounds))
        item = {"input_ids": inputs[lo:hi][None].to(device), "labels": labels[lo:hi][None].to(device),
                "position_ids": positions[lo:hi][None].to(device), "seqpar": ctx}
        return item, max(0, min(hi, total) - lo)

    def before_forward(self, batch: Any) -> Any:
        if isinstance(batch, dict) and "seqpar" in batch:
            batch = dict(batch)
            activate(batch.pop("seqpar"))
            self._started = time.perf_counter()
        else:
            activate(None)
        return batch

    def _grad_accumulated(self, _param: torch.Tensor) -> None:
        self._grads_done = time.perf_counter()

    def after_backward(self, micro_step: int, last_micro_step: bool) -> None:
        if self._schedule is not None:
            end = self._grads_done if self._grads_done > self._started else time.perf_counter()
            self._times.append(end - self._started)

    def after_step(self, step: int) -> None:
        activate(None)
        schedule, self._schedule = self._schedule, None
        if schedule is None or len(self._times) != len(schedule.micro_batches):
            return
        k = len(self._times)
        mine = torch.tensor(self._times, dtype=torch.float64, device=self.engine.device)
        every = torch.empty(self.world * k, dtype=torch.float64, device=self.engine.device)
        self.comm.all_gather(every, mine)
        per_rank = every.view(self.world, k).cpu()
        from dtrain.seqpar.calibrate import GroupSample, predict_step

        spreads, measured, self._samples = [], 0.0, []
        for m, mb in enumerate(schedule.micro_batches):
            group_times = [max(float(per_rank[r, m]) for r in g.ranks) for g in mb]
            self._samples += [GroupSample(g.size, tuple(self._lengths[s] for s in g.sequences), t)
                              for g, t in zip(mb, group_times)]
            measured += max(group_times)
            spreads.append((max(group_times) - min(group_times)) / max(group_times) if max(group_times) > 0 else 0.0)
        self._metrics = {
            "plan_solve_s": self._solve_s, "plan_wait_s": self._wait_s,
            "sp_groups": [sorted((g.size for g in mb), reverse=True) for mb in schedule.micro_batches],
            "sp_group_spread": sum(spreads) / len(spreads),
            "sp_measured_s": measured,
        }
        if schedule.source:
            self._metrics["plan_choice"] = schedule.source
        if self.shape is not None:  # every schedule, planned or hand-written, under the same model
            self._metrics["plan_predicted_s"] = predict_step(self._cost(self.world),
                                                             _group_lengths(schedule, self._lengths))

    def group_samples(self) -> list[Any]:
        """The last step's :class:`dtrain.seqpar.calibrate.GroupSample` s: per micro-batch and group,
        the group's sizes and lengths and its slowest rank's forward + backward seconds."""
        return list(self._samples)

    def metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    def teardown(self) -> None:
        activate(None)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _group_lengths(schedule: sched.Schedule, lengths: Sequence[int]) -> list[list[tuple[int, list[int]]]]:
    """Per micro-batch, each group's size and its sequences' lengths (what the cost model prices)."""
    return [[(g.size, [lengths[i] for i in g.sequences]) for g in mb] for mb in schedule.micro_batches]
