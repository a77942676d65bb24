"""Erasure coding, the restore decision and fault specs, without processes.

Coding is checked exhaustively on small groups: for every set of up to m lost nodes, every lost
chunk is rebuilt byte for byte from the survivors (chunks of unequal length included).
"""
import itertools
import random

import pytest

from dtrain.faults.spec import FaultSpecError, check_fits, expand_chaos, parse
from dtrain.snapshot.coding import GroupLayout, chunk_bounds, decode_chunk, encode_parity
from dtrain.snapshot.recovery import choose_in_memory


@pytest.mark.parametrize("k,m", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)])
def test_any_m_lost_nodes_are_rebuilt_exactly(k, m):
    rng = random.Random(k * 10 + m)
    group = GroupLayout(tuple(range(k + m)), k, m)
    blobs = {n: rng.randbytes(rng.randrange(1, 300)) for n in group.nodes}
    chunk = {}  # (node, stripe) -> bytes
    for n in group.nodes:
        for c, stripe in enumerate(group.data_stripes(n)):
            a, b = chunk_bounds(len(blobs[n]), k, c)
            chunk[n, stripe] = blobs[n][a:b]
    parity = {}  # (node, stripe) -> block
    for stripe in range(group.size):
        data = [chunk[n, stripe] for n in group.data_nodes(stripe)]
        for i, p in enumerate(group.parity_nodes(stripe)):
            parity[p, stripe] = encode_parity(data, k, m, i)
    widest = max(len(b) for b in blobs.values())  # parity is as wide as a stripe's widest chunk
    assert all(len(v) <= -(-widest // k) + 8 for v in parity.values())
    for lost in itertools.chain.from_iterable(itertools.combinations(group.nodes, r) for r in range(1, m + 1)):
        for n in lost:
            rebuilt = b""
            for stripe in group.data_stripes(n):
                data, par = group.data_nodes(stripe), group.parity_nodes(stripe)
                blocks = {i: chunk[d, stripe] for i, d in enumerate(data) if d not in lost}
                blocks.update({k + i: parity[p, stripe] for i, p in enumerate(par) if p not in lost})
                blocks = dict(list(blocks.items())[:k])
                rebuilt += decode_chunk(blocks, k, m, data.index(n), len(chunk[n, stripe]))
            assert rebuilt == blobs[n], (k, m, lost, n)


def test_every_node_stores_k_chunks_and_m_parity_blocks():
    group = GroupLayout((3, 4, 5), 2, 1)
    for n in group.nodes:
        assert len(group.data_stripes(n)) == 2 and len(group.parity_stripes(n)) == 1
    assert group.overhead() == 1.5
    with pytest.raises(ValueError, match="do not split into coding groups"):
        GroupLayout.for_job(4, 2, 1)


def _status(node, steps):
    return {"node": node, "steps": {str(s): {"local": local, "parity": parity, "committed": True}
                                    for s, (local, parity) in steps.items()}}


def test_restore_picks_newest_step_every_node_can_have_back():
    groups = GroupLayout.for_job(3, 2, 1)
    g = groups[0]
    full = {n: {4: (True, g.parity_stripes(n)), 5: (True, g.parity_stripes(n))} for n in range(3)}
    statuses = [_status(n, full[n]) for n in range(3)]
    assert choose_in_memory(statuses, groups) == (5, [])
    statuses[2] = _status(2, {4: (True, g.parity_stripes(2))})  # node 2 never finished step 5
    assert choose_in_memory(statuses, groups) == (5, [2])  # ... but parity covers it
    statuses[1] = _status(1, {})  # node 1 lost as well: step 5 has one block per stripe left
    assert choose_in_memory(statuses, groups) == (4, [1])
    statuses[0] = _status(0, {})  # two of three nodes lost: more than m, nothing in memory
    assert choose_in_memory(statuses, groups) == (None, [])


def test_fault_specs_parse_and_explain_errors():
    f = parse("kill:rank=1,step=20")
    assert f.kind == "kill" and f.get("rank") == 1 and f.get("step") == 20
    for bad, message in [("explode:rank=1", "unknown fault kind"), ("kill:rank=1", "missing step"),
                         ("kill:rank=x,step=2", "rank must be an integer"), ("slow:rank=1,ms=5,foo=2", "unknown key"),
                         ("kill:rank1,step=2", "is not key=value")]:
        with pytest.raises(FaultSpecError, match=message):
            parse(bad)
    with pytest.raises(FaultSpecError, match="rank 4 does not exist"):
        check_fits([parse("kill:rank=4,step=2")], world=4, nodes=2, total_steps=10)
    with pytest.raises(FaultSpecError, match="would never fire"):
        check_fits([parse("kill:rank=0,step=10")], world=4, nodes=2, total_steps=10)


def test_chaos_is_seeded_and_spreads_faults():
    chaos = parse("chaos:faults=5,seed=3")
    a = expand_chaos(chaos, world=4, nodes=2, total_steps=24, snapshots=True, first_index=100)
    b = expand_chaos(chaos, world=4, nodes=2, total_steps=24, snapshots=True, first_index=100)
    assert a == b and len(a) == 5 and len({f.get("step") for f in a}) == 5
    assert all(f.kind in {"kill", "hang", "corrupt", "node-loss"} for f in a)
