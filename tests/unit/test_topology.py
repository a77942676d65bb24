"""Topology shapes: levels (built-in and declared), blocks, peers, aligned block groups, byte
attribution, and errors for worlds that do not fit. No processes: group creation and collectives
go to a fake torch.distributed that records them."""
from types import SimpleNamespace

import pytest
import torch

from dtrain.comm import Comm
from dtrain.config import Config, ConfigError
from dtrain.topology import Shape, Topology, TopologyError


def test_two_nodes_of_two():
    s = Shape.of(4, 3, nodes=2)
    assert (s.nodes, s.procs_per_node, s.node_rank, s.local_rank) == (2, 2, 1, 1)
    assert s.blocks("node") == [[0, 1], [2, 3]]
    assert s.peers("node") == [[0, 2], [1, 3]]
    assert s.block_of("global") == [0, 1, 2, 3]
    assert s.level_of_ranks([0, 1]) == "node"
    assert s.level_of_ranks([1, 3]) == "global"


def test_extra_level_and_errors():
    s = Shape.of(8, 5, nodes=2, levels={"pair": 2})
    assert [n for n, _ in s.levels] == ["pair", "node", "global"]
    assert s.block_of("pair") == [4, 5]
    with pytest.raises(TopologyError, match="cannot be split into 3 nodes"):
        Shape.of(4, 0, nodes=3)
    with pytest.raises(TopologyError, match=r"topology.levels.pair = 2 does not fit"):
        Shape.of(6, 0, nodes=2, levels={"pair": 2})
    with pytest.raises(TopologyError, match="unknown topology level"):
        s.size("rack")


# ---------------------------------------------------------------- declared levels (issue 12, item 4)

@pytest.mark.parametrize("world,nodes,levels,order", [
    (8, 2, {"pair": 2}, ["pair", "node", "global"]),
    (8, 4, {"rack": 4}, ["node", "rack", "global"]),           # a multiple of the node size
    (8, 2, {"same": 4}, ["node", "same", "global"]),            # equal sizes: the built-in first
    (16, 2, {"pair": 2, "quad": 4}, ["pair", "quad", "node", "global"]),
    (4, 1, {"one": 1}, ["one", "node", "global"]),
])
def test_declared_levels_order_smallest_first(world, nodes, levels, order):
    s = Shape.of(world, 0, nodes, levels)
    assert s.level_names == order
    assert [size for _, size in s.levels] == sorted(size for _, size in s.levels)


def test_declared_level_blocks_and_byte_attribution():
    s = Shape.of(8, 5, nodes=2, levels={"pair": 2, "rack": 8})
    assert s.blocks("pair") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert s.peers("pair") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert s.peers_of("pair") == [1, 3, 5, 7]
    assert s.level_of_ranks([4, 5]) == "pair"
    assert s.level_of_ranks([4, 6]) == "node"
    assert s.level_of_ranks([3, 4]) == "global"  # equal to rack's size: the built-in level wins
    assert s.level_names == ["pair", "node", "global", "rack"]


@pytest.mark.parametrize("world,nodes,levels,match", [
    (8, 2, {"tri": 3}, r"topology.levels.tri = 3 does not fit 2 node\(s\) of 4 rank\(s\) \(world 8\).*\[1, 2, 4, 8\]"),
    (8, 4, {"big": 16}, r"topology.levels.big = 16 does not fit"),
    (12, 1, {"a": 4, "b": 6}, r"level 'a' \(size 4\) does not divide level 'b' \(size 6\)"),
    (8, 2, {"node": 2}, r"topology.levels.node: 'node' is a built-in level"),
    (8, 2, {"zero": 0}, r"topology.levels.zero = 0 does not fit"),
])
def test_bad_levels_are_rejected_naming_the_key(world, nodes, levels, match):
    with pytest.raises(TopologyError, match=match):
        Shape.of(world, 0, nodes, levels)


def test_levels_in_the_config():
    cfg = Config.load({"topology": {"levels": {"pair": 2}}}, ["topology.levels.quad=4"])
    assert cfg.topology.levels == {"pair": 2, "quad": 4}
    assert Config.load({}, ["topology.levels={pair = 2}"]).topology.levels == {"pair": 2}
    for levels, match in [({"pair": "2"}, r"topology.levels.pair must be int, got str"),
                          ({"pair": 0}, r"topology.levels.pair = 0 is not allowed"),
                          ({"rank": 2}, r"topology.levels.rank = 2 is not allowed; expected a name other"),
                          ({"a-b": 2}, r"topology.levels.a-b = 2 is not allowed; expected a level name"),
                          (3, r"topology.levels must be a table of str -> int")]:
        with pytest.raises(ConfigError, match=match):
            Config.load({"topology": {"levels": levels}})
    assert issubclass(TopologyError, ConfigError)


def test_aligned_blocks():
    s = Shape.of(8, 6, nodes=2)
    assert s.aligned_blocks(4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert s.aligned_block_of(2) == [6, 7] and s.aligned_block_of(8) == list(range(8))
    assert s.aligned_block_of(1) == [6]
    for bad in (3, 6, 16, 0):
        with pytest.raises(TopologyError, match=rf"block size {bad} is not allowed for world size 8; "
                                                r"expected a power of two dividing it: one of \[1, 2, 4, 8\]"):
            s.aligned_blocks(bad)
    with pytest.raises(TopologyError, match=r"one of \[1, 2\]"):
        Shape.of(6, 0, nodes=1).aligned_blocks(4)


class FakeDist:
    """Stands in for torch.distributed: records every new_group call (ranks, in order)."""

    class Work:
        def wait(self, timeout=None):
            return True

    def __init__(self):
        self.created: list[list[int]] = []
        self.launched: list[tuple[str, object]] = []
        self.group = SimpleNamespace(WORLD="WORLD")

    def is_initialized(self):
        return True

    def new_group(self, ranks):
        self.created.append(list(ranks))
        return f"g{ranks}"

    def all_to_all_single(self, output, input, out_splits, in_splits, group=None, async_op=False):
        self.launched.append(("all_to_all_single", group))
        return self.Work()

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self.launched.append(("all_reduce", group))
        return self.Work()


@pytest.fixture
def fake_dist(monkeypatch):
    fake = FakeDist()
    for name in ("is_initialized", "new_group", "all_to_all_single", "all_reduce", "group"):
        monkeypatch.setattr(torch.distributed, name, getattr(fake, name))
    return fake


def test_groups_are_created_identically_on_every_rank_and_shared(fake_dist):
    per_rank = []
    for rank in range(8):
        fake_dist.created.clear()
        topo = Topology.build(Shape.of(8, rank, nodes=2, levels={"pair": 2, "quad": 4}))
        built = list(fake_dist.created)
        assert topo.block_group(2) == f"g{[rank - rank % 2, rank - rank % 2 + 1]}"
        assert topo.block_group(4) is topo.group("node")  # same ranks: the node's group, no new one
        assert topo.block_group(2) is topo.group("pair") and topo.block_group("quad") is topo.group("node")
        assert topo.block_group(8) == "WORLD" and topo.block_group(1) is None
        assert fake_dist.created == built  # every aligned size was already a level: nothing new
        per_rank.append(built)
    assert all(calls == per_rank[0] for calls in per_rank)  # same groups, same order, on every rank
    # pair blocks, pair peers, then quad's (== node's) peers; node/quad blocks are created once
    assert per_rank[0][:4] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert len(per_rank[0]) == len({tuple(r) for r in per_rank[0]})


def test_block_groups_are_created_lazily_all_blocks_at_once(fake_dist):
    topo = Topology.build(Shape.of(16, 9, nodes=1))
    fake_dist.created.clear()
    assert topo.block_group(4) == "g[8, 9, 10, 11]"
    assert fake_dist.created == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert topo.block_group(4) == "g[8, 9, 10, 11]" and len(fake_dist.created) == 4  # cached
    with pytest.raises(TopologyError, match="block size 3"):
        topo.block_group(3)


def test_all_to_all_single_counts_bytes_at_the_smallest_level(fake_dist):
    topo = Topology.build(Shape.of(8, 5, nodes=2, levels={"pair": 2}))
    comm = Comm(topo, timeout_s=5)
    x = torch.zeros(8, 3)  # 96 bytes
    comm.all_to_all_single(torch.empty_like(x), x, "pair")           # 1 of 2 chunks leaves
    comm.all_to_all_single(torch.empty_like(x), x, "node")           # 3 of 4 chunks
    comm.all_to_all_single(torch.empty_like(x), x, 2)                # aligned block of 2 == pair
    comm.all_to_all_single(torch.empty_like(x), x, input_split_sizes=[1, 0, 2, 0, 0, 5, 0, 0],
                           output_split_sizes=[1] * 8)              # 3 rows to others; 5 stay here
    assert dict(comm.bytes_sent) == {"pair": 48 + 48, "node": 72, "global": 3 * 12}
    assert [g for _, g in fake_dist.launched] == ["g[4, 5]", "g[4, 5, 6, 7]", "g[4, 5]", "WORLD"]
    with pytest.raises(TopologyError, match="block size 6"):
        comm.all_to_all_single(torch.empty_like(x), x, 6)


def test_runtime_levels_single_process():
    """A single process builds the declared levels it can hold (size 1); others are rejected."""
    from dtrain import runtime

    runtime.shutdown()
    try:
        rt = runtime.init(Config.load({"topology": {"levels": {"solo": 1}}}))
        assert rt.topology.shape.level_names == ["node", "global", "solo"]  # equal sizes: built-ins first
        rt = runtime.init(Config.load({"topology": {"levels": {"solo": 1, "me": 1}}}))  # re-init adds
        assert "me" in rt.topology.shape.level_names
        with pytest.raises(TopologyError, match="topology.levels.solo = 2 conflicts"):
            runtime.init(Config.load({"topology": {"levels": {"solo": 2}}}))
    finally:
        runtime.shutdown()
    with pytest.raises(TopologyError, match=r"topology.levels.pair = 2 does not fit 1 node\(s\) of 1 rank"):
        runtime.init(Config.load({"topology": {"levels": {"pair": 2}}}))
    runtime.shutdown()
