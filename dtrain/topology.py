"""Cluster shape: nodes x procs, named levels, and the process groups of each level.

Ranks are laid out on a grid ``arange(world).view(nodes, procs_per_node)``. A *level* is a
partition of the ranks into equal contiguous blocks: ``node`` (the ranks of one node) and
``global`` (everyone). Further levels (e.g. ``pair``) can be declared with a block size that
divides the next level's. For each level this module also builds the *peer* groups: ranks with
the same position inside their block (for ``node``: the same local rank on every node), which is
what hierarchical sharding and inter-node synchronisation need.

The shape alone (:class:`Shape`) is pure and testable without processes; :class:`Topology`
adds the torch.distributed groups, created identically on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class TopologyError(ValueError):
    """The world does not fit the requested shape."""


@dataclass(frozen=True)
class Shape:
    """World size, rank and named levels (level name -> ranks per block), smallest first."""

    world_size: int
    rank: int
    levels: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, world_size: int, rank: int, nodes: int, extra_levels: dict[str, int] | None = None) -> "Shape":
        if nodes < 1 or world_size % nodes:
            raise TopologyError(
                f"world size {world_size} cannot be split into {nodes} nodes of equal size; "
                f"use --nodes M with M dividing the number of ranks (or --nproc N per node)"
            )
        sizes = {"node": world_size // nodes, "global": world_size, **(extra_levels or {})}
        levels = tuple(sorted(sizes.items(), key=lambda kv: (kv[1], kv[0] != "node")))
        for (small, s), (big, b) in zip(levels, levels[1:]):
            if b % s:
                raise TopologyError(f"level {small!r} (size {s}) does not divide level {big!r} (size {b})")
        return cls(world_size=world_size, rank=rank, levels=levels)

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

    def size(self, level: str) -> int:
        if level == "rank":  # pseudo-level: every rank alone (e.g. CO2 without intra-node sync)
            return 1
        for name, size in self.levels:
            if name == level:
                return size
        raise TopologyError(f"unknown topology level {level!r}; levels are {[n for n, _ in self.levels]}")

    def blocks(self, level: str) -> list[list[int]]:
        """All blocks of ``level``: contiguous rank ranges of its size."""
        s = self.size(level)
        grid = torch.arange(self.world_size).view(-1, s)
        return [row.tolist() for row in grid]

    def peers(self, level: str) -> list[list[int]]:
        """Ranks holding the same position inside their ``level`` block (one list per position)."""
        s = self.size(level)
        grid = torch.arange(self.world_size).view(-1, s)
        return [col.tolist() for col in grid.t()]

    def block_of(self, level: str) -> list[int]:
        return next(b for b in self.blocks(level) if self.rank in b)

    def peers_of(self, level: str) -> list[int]:
        return next(p for p in self.peers(level) if self.rank in p)

    def level_of_ranks(self, ranks: list[int]) -> str:
        """The smallest level whose blocks contain all of ``ranks`` (for byte accounting)."""
        for name, size in self.levels:
            if len({r // size for r in ranks}) == 1:
                return name
        return "global"


@dataclass
class Topology:
    """A :class:`Shape` plus the process groups of each level, built on every rank."""

    shape: Shape
    _groups: dict[tuple[str, str], dist.ProcessGroup | None] = field(default_factory=dict)

    @classmethod
    def build(cls, shape: Shape) -> "Topology":
        topo = cls(shape)
        if shape.world_size == 1 or not dist.is_initialized():
            return topo
        # new_group must be called by every rank for every group, in the same order.
        for name, size in shape.levels:
            for kind, lists in (("block", shape.blocks(name)), ("peer", shape.peers(name))):
                mine = None
                for ranks in lists:
                    if len(ranks) == shape.world_size:
                        group = dist.group.WORLD
                    elif len(ranks) == 1:
                        group = None
                    else:
                        group = dist.new_group(ranks)
                    if shape.rank in ranks:
                        mine = group
                topo._groups[(kind, name)] = mine
        return topo

    def group(self, level: str) -> dist.ProcessGroup | None:
        """This rank's block group at ``level`` (None when the block is just this rank)."""
        return self._groups.get(("block", level), dist.group.WORLD if level == "global" else None)

    def peer_group(self, level: str) -> dist.ProcessGroup | None:
        return self._groups.get(("peer", level))
