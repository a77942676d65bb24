"""Erasure coding, blobs, the snapshot process's buffers, the restore decision and fault specs,
without processes.

Coding is checked exhaustively on small groups: for every set of up to m lost nodes, every lost
chunk is rebuilt byte for byte from the survivors (chunks of unequal length included), with parity
blocks coded into fresh buffers and into reused ones that still hold another step's bytes.
"""
import itertools
import os
import random

import numpy as np
import pytest
import torch

from dtrain.checkpoint import FORMAT, Flat, RankState, _np_state, _tuples
from dtrain.faults.spec import FaultSpecError, check_fits, expand_chaos, parse
from dtrain.snapshot import blob as blobs
from dtrain.snapshot.coding import GroupLayout, chunk_bounds, decode_chunk, encode_parity
from dtrain.snapshot.daemon import _BufferPool
from dtrain.snapshot.recovery import agreed_steps, choose_in_memory, persisted_steps
from dtrain.snapshot.slots import SlotMaps


def _dirty(n: int) -> memoryview:
    """A reused buffer: it still holds some earlier step's bytes."""
    return memoryview(bytearray(b"\xa5" * n))


@pytest.mark.parametrize("reused", [False, True])
@pytest.mark.parametrize("k,m", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)])
def test_any_m_lost_nodes_are_rebuilt_exactly(k, m, reused):
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
            parity[p, stripe] = encode_parity(data, k, m, i, _dirty if reused else None)
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


def test_disk_tier_restores_only_steps_every_rank_listed(tmp_path):
    """A daemon that outlived the failure finishes writing step 8 between two ranks' listings (the
    three-node test's intermittent hang: rank 2 loaded step 8, ranks 0 and 1 step 6, and the next
    collective never completed): the ranks agree on step 6."""
    def persist(step: int, nodes: range) -> None:
        d = tmp_path / f"step-{step:09d}"
        d.mkdir(exist_ok=True)
        for n in nodes:
            (d / f"node{n}.json").write_text('{"fingerprint": "f", "table": []}')

    persist(6, range(3))
    persist(8, range(2))  # node 2's index of step 8 not written yet
    early = [step for step, _ in persisted_steps(tmp_path, 3)]
    persist(8, range(2, 3))  # ... and now it is
    late = [step for step, _ in persisted_steps(tmp_path, 3)]
    assert early == [6] and late == [8, 6]
    assert agreed_steps([early, early, late]) == {6}
    assert agreed_steps([late, late, late]) == {8, 6} and agreed_steps([]) == set()


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


def test_buffer_pool_reuses_only_its_own_buffers_once_given_back():
    pool = _BufferPool()
    a, b = pool.take(1000), pool.take(1000)
    assert a.obj is not b.obj and len(a) == len(b) == 1000
    pool.give(memoryview(bytearray(1000)))  # not the pool's: ignored
    pool.give(a)
    pool.give(a)  # twice: still handed out once
    c, d = pool.take(900), pool.take(900)
    assert c.obj is a.obj and d.obj is not a.obj and len(c) == 900
    pool.give(b)
    assert pool.take(10 * 2**20).obj is not b.obj  # a much larger request never gets a small buffer


def test_slot_maps_follow_a_slot_that_grew_or_was_replaced(tmp_path):
    path = str(tmp_path / "r0.slot0")
    with open(path, "wb") as f:
        f.write(b"a" * 100)
    maps = SlotMaps()
    first = maps.view(path, 100)
    assert bytes(first) == b"a" * 100
    assert maps.view(path, 101) is None  # shorter than asked: the caller must grow it first
    with open(path, "r+b") as f:  # the snapshot process grows a slot in place
        f.write(b"b" * 300)
    assert bytes(maps.view(path, 300)) == b"b" * 300
    first.release()
    os.unlink(path)  # a new file under the same name (rebuilt after a node loss)
    with open(path, "wb") as f:
        f.write(b"c" * 50)
    assert bytes(maps.view(path, 50)) == b"c" * 50
    maps.close()
    writer = SlotMaps(writable=True)  # a rank writes its blob through its own mapping
    with writer.view(path, 50) as out:
        out[:3] = b"xyz"
    writer.close()
    with open(path, "rb") as f:
        assert f.read(4) == b"xyzc"


def test_blob_round_trip_restores_rng_states_and_tensors():
    random.seed(3)
    np.random.seed(4)
    info = {"python": random.getstate(), "numpy": np.random.get_state(), "plugins": {"co2": {"round": 2}}}
    tensors = {"u0.param": Flat.of(torch.arange(6.0)), "u0.optim.exp_avg": Flat.of(torch.ones(6))}
    state = RankState(tensors, info, {"format": FORMAT, "units": [], "parts": 1, "step": 7}, {})
    plan = blobs.plan(state, 7, 1, "fingerprint")
    buffer = bytearray(plan.nbytes)
    blobs.write(buffer, state, plan)
    reader = blobs.BlobReader(buffer)
    assert reader.step == 7 and reader.info["plugins"] == {"co2": {"round": 2}}
    assert torch.equal(reader.part(1).get_tensor("u0.param"), torch.arange(6.0))
    assert sorted(reader.part(1).keys()) == ["u0.optim.exp_avg", "u0.param"]  # RNG words are not tensors of the state
    expected = (random.random(), float(np.random.rand()))
    random.seed(0)
    np.random.seed(0)
    random.setstate(_tuples(reader.info["python"]))
    np.random.set_state(tuple(_np_state(reader.info["numpy"])))
    assert (random.random(), float(np.random.rand())) == expected
