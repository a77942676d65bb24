"""Topology shapes: levels, blocks, peers, and errors for worlds that do not fit."""
import pytest

from dtrain.topology import Shape, TopologyError


def test_two_nodes_of_two():
    s = Shape.of(4, 3, nodes=2)
    assert (s.nodes, s.procs_per_node, s.node_rank, s.local_rank) == (2, 2, 1, 1)
    assert s.blocks("node") == [[0, 1], [2, 3]]
    assert s.peers("node") == [[0, 2], [1, 3]]
    assert s.block_of("global") == [0, 1, 2, 3]
    assert s.level_of_ranks([0, 1]) == "node"
    assert s.level_of_ranks([1, 3]) == "global"


def test_extra_level_and_errors():
    s = Shape.of(8, 5, nodes=2, extra_levels={"pair": 2})
    assert [n for n, _ in s.levels] == ["pair", "node", "global"]
    assert s.block_of("pair") == [4, 5]
    with pytest.raises(TopologyError, match="cannot be split into 3 nodes"):
        Shape.of(4, 0, nodes=3)
    with pytest.raises(TopologyError, match="does not divide"):
        Shape.of(6, 0, nodes=2, extra_levels={"pair": 2})
    with pytest.raises(TopologyError, match="unknown topology level"):
        s.size("rack")
