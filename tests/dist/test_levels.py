"""Declared topology levels, aligned block groups and all_to_all_single on real gloo groups, and a
plugin defined outside dtrain configured through `dtrain launch`.

The collectives move small integers stored exactly in float64 (sums of rank ids), so results are
compared for equality; byte counts are exact by construction (they count what each rank sends).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.dist.harness import run_world

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def _levels_world() -> dict:
    import torch

    import dtrain
    from dtrain.comm import Comm
    from dtrain.topology import Shape, Topology

    rt = dtrain.init({"topology": {"levels": {"pair": 2}}})
    comm, rank = rt.comm, rt.rank
    out: dict = {"levels": rt.topology.shape.level_names, "pair": comm.group_ranks("pair")}

    t = torch.tensor([float(rank + 1)], dtype=torch.float64)
    comm.all_reduce(t, "pair")
    out["pair_sum"] = t.item()

    # all_to_all_single over the world: chunk j of rank r holds 10 * r + j.
    before = dict(comm.bytes_sent)
    x = torch.tensor([10.0 * rank + j for j in range(4)], dtype=torch.float64)
    y = torch.empty_like(x)
    comm.all_to_all_single(y, x)
    out["a2a_global"] = y.tolist()
    # uneven splits within the aligned block of 2: rank r sends r + 1 rows to its partner
    partner = rank ^ 1
    me_first = rank < partner
    send = torch.full((1 + rank + 1,), float(rank), dtype=torch.float64)
    in_splits = [1, rank + 1] if me_first else [rank + 1, 1]
    out_splits = [1, partner + 1] if me_first else [partner + 1, 1]
    recv = torch.empty(1 + partner + 1, dtype=torch.float64)
    comm.all_to_all_single(recv, send, 2, input_split_sizes=in_splits, output_split_sizes=out_splits)
    out["a2a_block"] = recv.tolist()
    out["bytes"] = {k: v - before.get(k, 0) for k, v in comm.bytes_sent.items() if v != before.get(k, 0)}
    out["block2_is_pair"] = comm.block_group(2) is rt.topology.group("pair")

    # A level strictly inside the node: the same 4 ranks seen as one node of 4 (groups created
    # collectively on the live process group, in the same order on every rank).
    inner = Comm(Topology.build(Shape.of(4, rank, nodes=1, levels={"pair": 2})), comm.timeout_s)
    t = torch.tensor([float(rank + 1)], dtype=torch.float64)
    inner.all_reduce(t, "pair")
    z = torch.empty(4, dtype=torch.float64)
    inner.all_to_all_single(z, torch.arange(4, dtype=torch.float64), "pair")  # 2 of 4 rows go out
    inner.all_to_all_single(z, torch.arange(4, dtype=torch.float64), "node")  # 3 of 4 rows go out
    out["inner"] = {"levels": inner.topology.shape.level_names, "sum": t.item(), "bytes": dict(inner.bytes_sent)}
    return out


def test_declared_pair_level_and_all_to_all_on_four_ranks():
    results = run_world(_levels_world, 4, nodes=2)
    for rank, r in enumerate(results):
        assert r["levels"] == ["node", "pair", "global"]  # pair == node here: node first (byte attribution)
        assert r["pair"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert r["pair_sum"] == {0: 3.0, 1: 3.0, 2: 7.0, 3: 7.0}[rank]
        assert r["a2a_global"] == [10.0 * src + rank for src in range(4)]
        partner = rank ^ 1
        mine = [float(rank)] if rank < partner else []
        theirs = [float(partner)] * (partner + 1)
        assert r["a2a_block"] == (mine + theirs if rank < partner else theirs + [float(rank)])
        # 3 of 4 float64 rows to others over global; rank + 1 rows to the partner, inside a node
        assert r["bytes"] == {"global": 3 * 8, "node": (rank + 1) * 8}
        assert r["block2_is_pair"]
        inner = r["inner"]
        assert inner["levels"] == ["pair", "node", "global"]
        assert inner["sum"] == {0: 3.0, 1: 3.0, 2: 7.0, 3: 7.0}[rank]
        assert inner["bytes"] == {"pair": 8 + 2 * 8, "node": 3 * 8}  # ring all-reduce of 8 B + a2a rows


PLUGIN_SCRIPT = """
import sys
from dataclasses import dataclass

import torch

import dtrain
from dtrain.plugins import Plugin, register


@register
class Probe(Plugin):
    name = "probe"
    slot = "observer.probe"

    @dataclass(kw_only=True)
    class Config:
        enabled: bool = False
        value: int = 1

    def after_step(self, step):
        self.seen = self.engine.config.probe.value


engine = dtrain.wrap(torch.nn.Linear(2, 1), lambda p: torch.optim.SGD(p, lr=0.1),
                     loss_fn=lambda out, batch: out.pow(2).mean())
engine.train_step(torch.ones(2, 2))
probe = next(p for p in engine.plugins if p.name == "probe")
duo = torch.tensor([float(engine.comm.rank + 1)])
engine.comm.all_reduce(duo, "duo")
levels = engine.comm.topology.shape.level_names
print(f"PROBE rank={engine.comm.rank} value={probe.seen} levels={','.join(levels)} duo={duo.item():.0f}")
assert probe.seen == int(sys.argv[1]), (probe.seen, sys.argv[1])
engine.close()
"""


def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtrain.launch.cli", "launch", *args], capture_output=True,
                          text=True, timeout=180, cwd=REPO)


def test_plugin_from_a_script_gets_overrides_through_dtrain_launch(tmp_path):
    script = tmp_path / "probe_script.py"
    script.write_text(textwrap.dedent(PLUGIN_SCRIPT))
    ok = _launch("--nproc", "2", "--set", "probe.enabled=true", "--set", "probe.value=7",
                 "--set", "topology.levels.duo=2", str(script), "7")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    lines = sorted(line[line.index("PROBE"):] for line in ok.stdout.splitlines() if "PROBE" in line)
    # one node of 2 ranks: node, global and duo have the same blocks; built-ins come first
    assert lines == [f"PROBE rank={r} value=7 levels=node,global,duo duo=3" for r in range(2)], ok.stdout

    bad = _launch("--nproc", "2", "--set", "probe.enabled=true", "--set", "probe.valu=7", str(script), "7")
    assert bad.returncode != 0
    text = bad.stdout + bad.stderr
    lines = [line for line in text.splitlines() if "probe.valu" in line]  # once per job (bootstrap)
    assert lines == ["dtrain: config error: unknown key 'probe.valu' in probe; allowed keys: enabled, value"], text
    assert bad.returncode == 2
    assert "Traceback" not in text
