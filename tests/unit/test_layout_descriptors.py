"""Layout bookkeeping without processes: every rank of a world is built in this one process with a
fake comm (collectives are no-ops: every rank starts from the same seeded model, which is what the
broadcasts guarantee in a real run), and the shard descriptors are checked across ranks:

- each kind's parts tile every unit's padded flat space exactly once over a data-parallel group;
- padding stays outside every parameter, and the unit table matches the model's parameters;
- the optimizer's pieces cover exactly the master range of each rank, split at param-group
  boundaries, and every param group has a parameter on every rank (placeholders when the rank owns
  none of the group), so every rank knows every group's scalar state;
- placements follow the stage table (docs/layouts.md), and co2's node level is honoured.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dtrain.config import Config
from dtrain.plugins.zero import Zero1Plugin, Zero2Plugin, Zero3Plugin, DDPPlugin
from dtrain.topology import Shape
from tests.dist.workloads import make_model

LAYOUTS = {0: DDPPlugin, 1: Zero1Plugin, 2: Zero2Plugin, 3: Zero3Plugin}


class FakeComm:
    """The part of :class:`dtrain.comm.Comm` a layout uses at wrap time, for one rank of a world."""

    def __init__(self, world: int, rank: int, nodes: int = 1) -> None:
        self.rank = rank
        self.topology = SimpleNamespace(shape=Shape.of(world, rank, nodes))

    def group_ranks(self, level: str, peers: bool = False) -> list[int]:
        shape = self.topology.shape
        if level == "rank":
            return [self.rank]
        if level == "global":
            return list(range(shape.world_size))
        return next(g for g in shape.blocks(level) if self.rank in g)

    def size(self, level: str, peers: bool = False) -> int:
        return len(self.group_ranks(level))

    def broadcast(self, tensor, src, level="global", **_):
        return None

    def all_reduce(self, tensor, level="global", **_):
        return None

    def all_gather(self, output, input, level="global", **_):
        """Only this rank's own part is known here: it lands at its place in ``output``."""
        index = self.group_ranks(level).index(self.rank)
        output[index * input.numel():(index + 1) * input.numel()].copy_(input)
        return SimpleNamespace(wait=lambda: None)


def _two_groups(params):
    params = list(params)
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-3)


def _layout(stage: int, world: int, rank: int, nodes: int = 1, level: str | None = None):
    model = make_model()
    layout = LAYOUTS[stage]()
    if level is not None:
        layout.level = level
    engine = SimpleNamespace(comm=FakeComm(world, rank, nodes), device=torch.device("cpu"),
                             config=Config.load({"zero": {"stage": stage, "bucket_mb": 0.05}}))
    layout.setup(engine)
    layout.wrap_model(model, _two_groups)
    return layout, model


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_parts_tile_every_unit_once(stage, world):
    layouts = [_layout(stage, world, r)[0] for r in range(world)]
    specs = layouts[0].unit_specs()
    assert all(l.unit_specs() == specs for l in layouts)  # every rank agrees on the unit table
    for kind in ("param", "grad", "master"):
        level, parts, _ = layouts[0].placement(kind)
        sharded = {"param": stage == 3, "grad": stage >= 2, "master": stage >= 1}[kind] and world > 1
        assert (parts > 1) == sharded, (kind, level, parts)
        for ui, spec in enumerate(specs):
            covered = sorted((l.shards(kind)[ui].lo, l.shards(kind)[ui].hi) for l in layouts)
            if parts == 1:
                assert set(covered) == {(0, spec.padded)}
            else:
                assert covered == [(i * spec.padded // world, (i + 1) * spec.padded // world) for i in range(world)]
            for l in layouts:
                shard = l.shards(kind)[ui]
                assert sum(p.hi - p.lo for p in shard.pieces) == shard.hi - shard.lo
                assert shard.primary == (parts > 1 or l.comm.rank == 0)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_unit_table_and_padding(stage):
    layout, model = _layout(stage, 3, 1)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    slots = {s.name: s for u in layout.unit_specs() for s in u.slots}
    assert slots.keys() == named.keys()
    for u in layout.unit_specs():
        assert u.padded % 3 == 0 and u.padded - sum(s.numel for s in u.slots) < 3
        ends = [(s.offset, s.offset + s.numel) for s in u.slots]
        assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # back to back
        assert [s.group for s in u.slots] == sorted(s.group for s in u.slots)  # ordered by group
        for s in u.slots:
            assert s.shape == tuple(named[s.name].shape)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_optimizer_pieces_cover_the_master_and_every_group(stage):
    world = 4
    for rank in range(world):
        layout, _ = _layout(stage, world, rank)
        masters = {m.unit.index: m for m in layout.shards("master")}
        covered: dict[int, list[tuple[int, int]]] = {}
        for unit, piece in layout.optimizer_pieces():
            assert piece.tensor.numel() == piece.hi - piece.lo
            slots = [s for s in unit.slots if s.offset < piece.hi and piece.lo < s.offset + s.numel]
            assert {s.group for s in slots} == {piece.group}  # a piece never straddles two groups
            covered.setdefault(unit.index, []).append((piece.lo, piece.hi))
        for ui, m in masters.items():
            real = [(max(s.offset, m.lo), min(s.offset + s.numel, m.hi)) for s in m.unit.slots
                    if max(s.offset, m.lo) < min(s.offset + s.numel, m.hi)]
            merged = sorted(covered.get(ui, []))
            assert sum(b - a for a, b in merged) == sum(b - a for a, b in real)
        groups = layout.optimizer.param_groups
        assert len(groups) == 2 and all(g["params"] for g in groups)  # placeholders fill missing groups
        owned = {id(p.tensor) for _, p in layout.optimizer_pieces()}
        for g in groups:
            for p in g["params"]:
                assert id(p) in owned or p.numel() == 0


def test_descriptors_share_storage_with_the_state():
    layout, model = _layout(1, 2, 1)
    master = layout.shards("master")[0]
    before = master.view().clone()
    master.view().add_(1.0)  # an outer step, a load: the master changed outside the optimizer
    assert torch.equal(layout.shards("master")[0].view(), before + 1)
    param = layout.shards("param")[0]
    # ZeRO-1 keeps no separate fp32 copy: the master part is a view of the working parameters
    assert torch.equal(param.view()[master.lo:master.hi], before + 1)
    assert master.view().data_ptr() == param.view().data_ptr() + master.lo * 4
    layout.publish()  # the other ranks' parts of the gather
    assert torch.equal(param.view()[master.lo:master.hi], before + 1)
    name = master.unit.slots[-1].name  # rank 1 holds the unit's tail
    assert model.get_parameter(name).data_ptr() == param.view().data_ptr() + master.unit.slots[-1].offset * 4
    with pytest.raises(ValueError, match="unknown kind"):
        layout.shards("moments")


def test_node_level_placement_for_co2():
    """co2 sets the layout's level to the node: ZeRO shards over the node's ranks only."""
    layouts = [_layout(1, 4, r, nodes=2, level="node")[0] for r in range(4)]
    assert [l.placement("master") for l in layouts] == [("node", 2, 0), ("node", 2, 1), ("node", 2, 0), ("node", 2, 1)]
    assert [l.shards("master")[0].primary for l in layouts] == [True, True, False, False]
