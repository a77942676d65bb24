"""What one step runs: micro-batches of sequence-parallel groups, each a rank block and its sequences.

A :class:`Schedule` comes from the planner's :class:`~dtrain.planner.StepPlan`
(:func:`from_step_plan`) or from a hand-written list (:func:`from_spec`:
``[[(2, [0, 1]), (1, [2]), (1, [3])], [(4, [4])]]`` = two micro-batches; groups take ranks in the
order given, so each must start at a multiple of its size). :func:`check` refuses a schedule that
cannot run (one line). :func:`encode` / :func:`decode` turn it into a fixed-size int64 tensor so
rank 0 can broadcast it in one collective (its size depends only on the batch size, which every
rank knows). Torch is used only by the encoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from dtrain.seqpar.ulysses import SeqParError


@dataclass(frozen=True)
class Group:
    ranks: tuple[int, ...]
    sequences: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass
class Schedule:
    micro_batches: list[list[Group]]
    predicted_s: list[list[float]] = field(default_factory=list)
    """The planner's modeled time of each group (empty for a hand-written schedule)."""
    world_size: int | None = None
    source: str = ""
    """Which candidate the runtime chose (``planner@0.95``, ``static-4``, ...; rank 0 only)."""

    def ranges(self) -> list[tuple[int, ...]]:
        """Distinct rank blocks of two ranks or more, in first-use order."""
        seen: dict[tuple[int, ...], None] = {}
        for mb in self.micro_batches:
            for g in mb:
                if g.size > 1:
                    seen.setdefault(g.ranks, None)
        return list(seen)

    def sizes(self) -> list[int]:
        return sorted({g.size for mb in self.micro_batches for g in mb})

    def group_of(self, micro: int, rank: int) -> Group | None:
        return next((g for g in self.micro_batches[micro] if rank in g.ranks), None)


def from_step_plan(plan: Any) -> Schedule:
    """A schedule from a :class:`dtrain.planner.StepPlan`."""
    mbs = [[Group(tuple(g.ranks), tuple(g.sequences)) for g in m.groups] for m in plan.micro_batches]
    times = [[float(g.time_s) for g in m.groups] for m in plan.micro_batches]
    return Schedule(mbs, times, world_size=plan.num_devices)


def from_spec(spec: Sequence[Sequence[tuple[int, Sequence[int]]]], world_size: int | None = None) -> Schedule:
    """A schedule from ``[[(size, [sequence indices]), ...], ...]`` (one inner list per micro-batch)."""
    mbs = []
    for m, groups in enumerate(spec):
        offset, out = 0, []
        for size, seqs in groups:
            if not isinstance(size, int) or size < 1:
                raise SeqParError(f"seqpar plan: micro-batch {m} has a group of size {size!r}; sizes are "
                                  f"positive powers of two")
            out.append(Group(tuple(range(offset, offset + size)), tuple(int(s) for s in seqs)))
            offset += size
        mbs.append(out)
    return Schedule(mbs, world_size=world_size)


def check(schedule: Schedule, world: int, lengths: Sequence[int], heads: int | None,
          max_tokens_per_rank: int | None) -> None:
    """Raise :class:`SeqParError` (one line) unless every rank can run ``schedule`` on this batch."""
    if schedule.world_size is not None and schedule.world_size != world:
        raise SeqParError(f"seqpar plan: the plan is for {schedule.world_size} ranks but this job has {world}; "
                          f"plan for --gpus {world} (or run with {schedule.world_size} ranks)")
    if not schedule.micro_batches:
        raise SeqParError("seqpar plan: the plan has no micro-batch; give every sequence to a group")
    used: list[int] = []
    for m, mb in enumerate(schedule.micro_batches):
        taken: set[int] = set()
        for g in mb:
            d, lo = g.size, g.ranks[0]
            where = f"seqpar plan: micro-batch {m}, group of {d} at ranks {lo}-{g.ranks[-1]}"
            if d & (d - 1) or lo % d or g.ranks[-1] >= world:
                raise SeqParError(f"{where}: groups are aligned power-of-two rank blocks inside the {world} "
                                  f"ranks (a group of d starts at a multiple of d); reorder or resize the groups")
            if taken & set(g.ranks):
                raise SeqParError(f"{where}: overlaps another group of the micro-batch")
            taken |= set(g.ranks)
            if heads is not None and heads % d:
                raise SeqParError(f"{where}: the model's {heads} attention heads are not divisible by {d}; "
                                  f"use group sizes dividing {heads}")
            if not g.sequences:
                raise SeqParError(f"{where}: has no sequence; leave the ranks out instead")
            bad = [s for s in g.sequences if not 0 <= s < len(lengths)]
            if bad:
                raise SeqParError(f"{where}: sequence index {bad[0]} is not in the batch of {len(lengths)}")
            tokens = sum(lengths[s] for s in g.sequences)
            if max_tokens_per_rank is not None and tokens > d * max_tokens_per_rank:
                raise SeqParError(f"{where}: holds {tokens} tokens, more than {d} x seqpar.max_tokens_per_rank="
                                  f"{max_tokens_per_rank}; give it fewer sequences or more ranks")
            used.extend(g.sequences)
    missing = sorted(set(range(len(lengths))) - set(used))
    twice = sorted({s for s in used if used.count(s) > 1})
    if missing or twice:
        what = f"sequence {missing[0]} is in no group" if missing else f"sequence {twice[0]} is in two groups"
        raise SeqParError(f"seqpar plan: {what}; every sequence of the batch must be in exactly one group")


def encoded_length(batch_size: int) -> int:
    """Size of :func:`encode`'s tensor for a batch of ``batch_size`` sequences (>= any schedule's)."""
    return 2 + 5 * batch_size


def encode(schedule: Schedule, batch_size: int) -> torch.Tensor:
    """``[K, (G, (first rank, size, n, seq...)*G)*K, 0...]`` as int64 of :func:`encoded_length`."""
    out = [len(schedule.micro_batches)]
    for mb in schedule.micro_batches:
        out.append(len(mb))
        for g in mb:
            out += [g.ranks[0], g.size, len(g.sequences), *g.sequences]
    buf = torch.zeros(encoded_length(batch_size), dtype=torch.int64)
    buf[:len(out)] = torch.tensor(out, dtype=torch.int64)
    return buf


def decode(buf: torch.Tensor, world_size: int) -> Schedule:
    values = buf.tolist()
    pos, mbs = 1, []
    for _ in range(values[0]):
        n_groups, pos = values[pos], pos + 1
        groups = []
        for _ in range(n_groups):
            lo, size, n = values[pos:pos + 3]
            groups.append(Group(tuple(range(lo, lo + size)), tuple(values[pos + 3:pos + 3 + n])))
            pos += 3 + n
        mbs.append(groups)
    return Schedule(mbs, world_size=world_size)


def static_schedule(lengths: Sequence[int], world: int, degree: int, max_tokens_per_rank: int | None,
                    seq_time: Any) -> Schedule:
    """Static Ulysses of ``degree``: ``world / degree`` groups of ``degree`` ranks in every micro-batch;
    sequences, longest first, go to the group with the least modeled load (``seq_time(s, degree)``)
    that still has room for them (``degree * max_tokens_per_rank`` tokens); a new micro-batch
    opens when none has. The baseline of benchmarks/seqpar.py; raises SeqParError when a sequence
    does not fit a group of ``degree``."""
    room = None if max_tokens_per_rank is None else degree * max_tokens_per_rank
    n_groups = world // degree
    mbs: list[list[list[int]]] = []
    loads: list[list[float]] = []
    tokens: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        s = lengths[i]
        if room is not None and s > room:
            raise SeqParError(f"static degree {degree}: sequence {i} has {s} tokens, more than a group of {degree} "
                              f"holds ({room})")
        spot = None
        for m in range(len(mbs)):
            fits = [g for g in range(n_groups) if room is None or tokens[m][g] + s <= room]
            if fits:
                spot = (m, min(fits, key=lambda g: (loads[m][g], g)))
                break
        if spot is None:
            mbs.append([[] for _ in range(n_groups)])
            loads.append([0.0] * n_groups)
            tokens.append([0] * n_groups)
            spot = (len(mbs) - 1, 0)
        m, g = spot
        mbs[m][g].append(i)
        loads[m][g] += seq_time(s, degree)
        tokens[m][g] += s
    groups = [[Group(tuple(range(g * degree, (g + 1) * degree)), tuple(seqs)) for g, seqs in enumerate(mb) if seqs]
              for mb in mbs]
    times = [[loads[m][g] for g, seqs in enumerate(mb) if seqs] for m, mb in enumerate(mbs)]
    return Schedule(groups, times, world_size=world)
