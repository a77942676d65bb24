"""Cluster shape: nodes x procs, named levels, aligned blocks, and their process groups.

Ranks are laid out on a grid ``arange(world).view(nodes, procs_per_node)``. A *level* is a
partition of the ranks into equal contiguous blocks: ``node`` (the ranks of one node),
``global`` (everyone) and the levels declared in ``topology.levels`` (e.g. ``pair = 2``). A
declared level's block size divides the node size or is a multiple of it that divides the world
size, and every level's blocks nest in the next larger level's. For each level this module also
builds the *peer* groups: ranks with the same position inside their block (for ``node``: the
same local rank on every node), which is what hierarchical sharding and inter-node
synchronisation need. Besides levels, :meth:`Topology.block_group` hands out groups of aligned
blocks of any power-of-two size, created on first request. The model is described in
docs/topology.md.

The shape alone (:class:`Shape`) is pure, torch-free and testable without processes (the
launcher can check a config against a world size before starting any rank); :class:`Topology`
adds the torch.distributed groups, created identically on every rank.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from dtrain.config import ConfigError

if TYPE_CHECKING:
    import torch.distributed as dist

BUILTIN_LEVELS = ("node", "global")
RESERVED_LEVELS = ("rank", *BUILTIN_LEVELS)
"""``rank`` is the pseudo-level of every rank alone; none of these may be declared."""


class TopologyError(ConfigError):
    """The world does not fit the requested shape (a config problem: the message names the key)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Shape:
    """World size, rank and named levels (level name -> ranks per block), smallest first.

    Levels of equal size keep the built-in one first, so byte attribution
    (:meth:`level_of_ranks`) names ``node``/``global`` rather than a declared alias of them.
    """

    world_size: int
    rank: int
    levels: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, world_size: int, rank: int, nodes: int, levels: Mapping[str, int] | None = None) -> "Shape":
        """The shape of ``world_size`` ranks on ``nodes`` nodes with the declared ``levels``."""
        if nodes < 1 or world_size % nodes:
            raise TopologyError(
                f"world size {world_size} cannot be split into {nodes} nodes of equal size; "
                f"use --nodes M with M dividing the number of ranks (or --nproc N per node)"
            )
        node = world_size // nodes
        for name, size in (levels or {}).items():
            key = f"topology.levels.{name}"
            if name in RESERVED_LEVELS:
                raise TopologyError(f"{key}: {name!r} is a built-in level; pick another name "
                                    f"(reserved: {', '.join(RESERVED_LEVELS)})")
            fits = (isinstance(size, int) and size >= 1
                    and (node % size == 0 or (size % node == 0 and world_size % size == 0)))
            if not fits:
                allowed = sorted({*_divisors(node), *(m for m in _divisors(world_size) if m % node == 0)})
                raise TopologyError(
                    f"{key} = {size!r} does not fit {nodes} node(s) of {node} rank(s) (world {world_size}); "
                    f"expected a divisor of the node size or a multiple of it dividing the world: "
                    f"one of {allowed}")
        builtin = {"node": node, "global": world_size}
        tie = {"node": 0, "global": 1}  # among equal sizes: node, global, then declared by name
        ordered = sorted([*builtin.items(), *(levels or {}).items()],
                         key=lambda kv: (kv[1], tie.get(kv[0], 2), kv[0]))
        for (small, s), (big, b) in zip(ordered, ordered[1:]):
            if b % s:
                raise TopologyError(
                    f"topology.levels: level {small!r} (size {s}) does not divide level {big!r} (size {b}); "
                    f"declared levels must nest (each size divides the next larger one)")
        return cls(world_size=world_size, rank=rank, levels=tuple(ordered))

    @property
    def nodes(self) -> int:
        return self.world_size // self.size("node")

    @property
    def procs_per_node(self) -> int:
        return self.size("node")

    @property
    def node_rank(self) -> int:
        return self.rank // self.procs_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.procs_per_node

    @property
    def level_names(self) -> list[str]:
        """Level names, smallest block first (the order of ``comm_bytes`` in the metrics)."""
        return [name for name, _ in self.levels]

    def size(self, level: str) -> int:
        if level == "rank":  # pseudo-level: every rank alone (e.g. CO2 without intra-node sync)
            return 1
        for name, size in self.levels:
            if name == level:
                return size
        raise TopologyError(f"unknown topology level {level!r}; levels are {self.level_names} "
                            f"(declare more in topology.levels)")

    def blocks(self, level: str) -> list[list[int]]:
        """All blocks of ``level``: contiguous rank ranges of its size."""
        return self._blocks(self.size(level))

    def peers(self, level: str) -> list[list[int]]:
        """Ranks holding the same position inside their ``level`` block (one list per position)."""
        s = self.size(level)
        return [list(range(j, self.world_size, s)) for j in range(s)]

    def peers_within(self, level: str, outer: str) -> list[int]:
        """This rank's peers of ``level`` inside its ``outer`` block (one step of a hierarchical
        collective: the ``outer`` block's ranks at this rank's position inside ``level`` blocks)."""
        block = self.block_of(outer)
        return [r for r in self.peers_of(level) if block[0] <= r <= block[-1]]

    def block_of(self, level: str) -> list[int]:
        return self._blocks(self.size(level))[self.rank // self.size(level)]

    def peers_of(self, level: str) -> list[int]:
        return list(range(self.rank % self.size(level), self.world_size, self.size(level)))

    def check_block_size(self, size: int) -> None:
        """An aligned block size must be a power of two dividing the world size."""
        if not (isinstance(size, int) and size >= 1 and size & (size - 1) == 0 and self.world_size % size == 0):
            allowed = [d for d in _divisors(self.world_size) if d & (d - 1) == 0]
            raise TopologyError(f"block size {size!r} is not allowed for world size {self.world_size}; "
                                f"expected a power of two dividing it: one of {allowed}")

    def aligned_blocks(self, size: int) -> list[list[int]]:
        """Every aligned block of ``size`` ranks: ``[k*size, (k+1)*size)`` for each k."""
        self.check_block_size(size)
        return self._blocks(size)

    def aligned_block_of(self, size: int) -> list[int]:
        """This rank's aligned block of ``size`` ranks."""
        return self.aligned_blocks(size)[self.rank // size]

    def level_of_ranks(self, ranks: list[int]) -> str:
        """The smallest level whose blocks contain all of ``ranks`` (for byte accounting)."""
        for name, size in self.levels:
            if len({r // size for r in ranks}) == 1:
                return name
        return "global"

    def _blocks(self, size: int) -> list[list[int]]:
        return [list(range(start, start + size)) for start in range(0, self.world_size, size)]


@dataclass
class Topology:
    """A :class:`Shape` plus the process groups of each level, built on every rank.

    Groups are created through one cache keyed by their ranks, so a declared level that equals
    ``node`` (or an aligned block size that equals a level's) shares that level's groups.
    """

    shape: Shape
    _groups: dict[tuple[str, str], Any] = field(default_factory=dict)
    _by_ranks: dict[tuple[int, ...], Any] = field(default_factory=dict)
    _aligned: dict[int, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, shape: Shape) -> "Topology":
        """Every level's block and peer groups (collective: every rank calls it with the same shape)."""
        topo = cls(shape)
        topo._build_levels([name for name, _ in shape.levels])
        return topo

    @property
    def _distributed(self) -> bool:
        import torch.distributed as dist

        return self.shape.world_size > 1 and dist.is_initialized()

    def _new_group(self, ranks: list[int]) -> Any:
        """The group of ``ranks``: WORLD, None for one rank, else cached or created.

        ``dist.new_group`` must be called by every rank for every group, in the same order; the
        callers below iterate every block of a partition, not only this rank's.
        """
        import torch.distributed as dist

        if len(ranks) == self.shape.world_size:
            return dist.group.WORLD
        if len(ranks) == 1:
            return None
        key = tuple(ranks)
        if key not in self._by_ranks:
            self._by_ranks[key] = dist.new_group(list(ranks))
        return self._by_ranks[key]

    def _build_levels(self, names: list[str]) -> None:
        if not self._distributed:
            return
        for name in names:
            for kind, lists in (("block", self.shape.blocks(name)), ("peer", self.shape.peers(name))):
                mine = None
                for ranks in lists:
                    group = self._new_group(ranks)
                    if self.shape.rank in ranks:
                        mine = group
                self._groups[(kind, name)] = mine

    def add_levels(self, levels: Mapping[str, int]) -> None:
        """Declare more levels after the fact (collective: every rank, same ``levels``, same order).

        A name already declared with another size is an error; the same size is a no-op.
        """
        current = dict(self.shape.levels)
        for name, size in levels.items():
            if name in current and current[name] != size:
                raise TopologyError(f"topology.levels.{name} = {size} conflicts with the level {name!r} "
                                    f"of size {current[name]} this process already built")
        new = {n: s for n, s in levels.items() if n not in current}
        if not new:
            return
        declared = {n: s for n, s in current.items() if n not in BUILTIN_LEVELS}
        self.shape = Shape.of(self.shape.world_size, self.shape.rank, self.shape.nodes, {**declared, **new})
        self._build_levels(list(new))

    def group(self, level: str) -> "dist.ProcessGroup | None":
        """This rank's block group at ``level`` (None when the block is just this rank)."""
        if ("block", level) not in self._groups and level == "global" and self._distributed:
            import torch.distributed as dist

            return dist.group.WORLD
        return self._groups.get(("block", level))

    def peer_group(self, level: str, within: str | None = None) -> "dist.ProcessGroup | None":
        """This rank's peer group of ``level`` (over the world, or inside its ``within`` block)."""
        if within is None or self.shape.size(within) == self.shape.world_size:
            return self._groups.get(("peer", level))
        return self._groups.get((f"peer<{within}", level))

    def build_peers_within(self, level: str, within: str) -> None:
        """Create the groups of ``level``'s peers inside every ``within`` block (collective: every
        rank calls it with the same arguments in the same order; later calls are no-ops)."""
        key = (f"peer<{within}", level)
        if not self._distributed or key in self._groups or self.shape.size(within) == self.shape.world_size:
            return
        s, outer = self.shape.size(level), self.shape.size(within)
        mine = None
        for start in range(0, self.shape.world_size, outer):
            for j in range(s):
                ranks = list(range(start + j, start + outer, s))
                group = self._new_group(ranks)
                if self.shape.rank in ranks:
                    mine = group
        self._groups[key] = mine

    def range_group(self, ranks: "tuple[int, ...] | list[int]") -> "dist.ProcessGroup | None":
        """The group of one aligned block ``ranks`` (``[k*s, (k+1)*s)``, ``s`` a power of two
        dividing the world), created on first request and cached by its ranks.

        Unlike :meth:`block_group` only this block's group is created, so a runtime that regroups
        ranks per step (sequence parallelism, dtrain/seqpar) creates exactly the groups it uses.
        Creating one is a collective: every rank requests the same blocks in the same order, from
        the training thread. None when the block is this rank alone or the process is not
        distributed; the whole world is ``WORLD``.
        """
        ranks = list(ranks)
        size = len(ranks)
        self.shape.check_block_size(size)
        if ranks != list(range(ranks[0], ranks[0] + size)) or ranks[0] % size:
            raise TopologyError(f"ranks {ranks} are not an aligned block: expected [k*{size}, (k+1)*{size}) "
                                f"for some k")
        if not self._distributed:
            return None
        with self._lock:
            return self._new_group(ranks)

    def block_group(self, size: int | str) -> "dist.ProcessGroup | None":
        """This rank's group of the aligned block of ``size`` ranks (or of the level named ``size``).

        The first request for a size creates the groups of *all* aligned blocks of that size, so
        it is a collective: every rank must request the same sizes in the same order (e.g. the
        sizes of a plan every rank computed alike, from the training thread), including ranks
        that will not use the block. Later requests are cached lookups. None when the block is
        this rank alone or the process is not distributed.
        """
        if isinstance(size, str):
            return self.group(size)
        blocks = self.shape.aligned_blocks(size)  # raises TopologyError for a bad size
        with self._lock:
            if size not in self._aligned:
                mine = None
                if self._distributed:
                    for ranks in blocks:
                        group = self._new_group(ranks)
                        if self.shape.rank in ranks:
                            mine = group
                self._aligned[size] = mine
            return self._aligned[size]
