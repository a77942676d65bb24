"""The ``co2`` step plugin on real gloo groups (simulated nodes on one machine).

* tau = 1, beta = 0, alpha = 1, penalty "off", no clip, synchronous outer step == DDP, within the
  tolerance of test_equivalence.py (atol 2e-5 / rtol 1e-4): CO2 averages parameters after a
  local SGD step where DDP averages gradients, and computes x_outer - (x_outer - xbar), so each
  parameter carries a few ulps of rounding difference (see the module docstring of
  dtrain/plugins/co2.py). Inner optimizer: plain SGD (AdamW of a mean gradient is not the mean
  of AdamW steps, so no local method equals DDP under Adam).
* the overlapped (threaded) outer sync equals the blocking execution of the same equations with
  the same one-round staleness, bit for bit (param_sha256 on every rank), and sending the outer
  all-reduce in small chunks gives the same bits as one collective per unit (2 workers: a sum
  of two is exact in any split);
* clipping clips: the outer momentum never leaves [-phi, phi] and x_outer moved by alpha * m
  (a non in-place ``m.clamp(...)`` leaves |m| > phi and fails);
* save in the middle of a round (an outer sync in flight) and resume: bit-exact;
* the outer state is sharded 1/N across a node's ranks and inter-node bytes are counted.
"""
import json

import pytest
import torch

import dtrain
from dtrain.metrics import is_step_record
from tests.dist.harness import run_world
from tests.dist.workloads import local_batch, make_model, optimizer_factory

pytestmark = pytest.mark.dist


def plain_sgd(params):
    return torch.optim.SGD(params, lr=0.1, weight_decay=0.01)


def _co2(engine):
    return next(p for p in engine.plugins if p.name == "co2")


def _train(config: dict, steps: int, factory=optimizer_factory, blocking: bool = False,
           engine=None, start: int = 0):
    engine = engine or dtrain.wrap(make_model(), optimizer=factory, config=config)
    if blocking:
        _co2(engine).blocking = True
    rank, world = engine.runtime.rank, engine.runtime.world_size
    losses = [float(engine.train_step(local_batch(s, rank, world))) for s in range(start, start + steps)]
    return engine, losses


def _ddp_vs_co2(runs: dict[str, dict], steps: int) -> dict[str, dict]:
    out = {}
    for name, cfg in runs.items():
        engine, losses = _train(cfg, steps, factory=plain_sgd)
        out[name] = {"losses": losses, "params": engine.full_parameters()}
    return out


EXACT = {"local_steps": 1, "outer_momentum": 0.0, "outer_lr": 1.0, "penalty": "off", "clip": None,
         "overlap": False}


@pytest.mark.parametrize("world,nodes,stages,intra", [(4, 2, (0, 2), True), (2, 1, (1,), False)])
def test_tau1_sync_equals_ddp(world, nodes, stages, intra):
    runs = {"ddp": {}}
    for st in stages:
        runs[f"co2-zero{st}"] = {"zero": {"stage": st}, "co2": {"enabled": True, **EXACT, "intra_node_sync": intra}}
    got = run_world(_ddp_vs_co2, world, runs, 5, nodes=nodes)
    ref = got[0]["ddp"]
    for name in runs:
        # DDP returns the global mean loss; co2 each worker's own (node or rank) mean, whose mean
        # over the ranks is the global one
        mean = [sum(r[name]["losses"][i] for r in got) / world for i in range(len(ref["losses"]))]
        assert mean == pytest.approx(ref["losses"], rel=1e-5), name
    for rank_result in got:
        for name, run in rank_result.items():
            for pname, p in ref["params"].items():
                torch.testing.assert_close(run["params"][pname], p, atol=2e-5, rtol=1e-4,
                                           msg=lambda m: f"{name} {pname}: {m}")
    moved = (ref["params"]["blocks.0.mlp.0.weight"] - make_model().blocks[0].mlp[0].weight).abs().max()
    assert moved > 1e-3


CO2 = {"enabled": True, "local_steps": 2, "outer_momentum": 0.5, "outer_lr": 0.8, "penalty": "adaptive",
       "clip": 5e-3}


def _async_vs_blocking(stage: int, steps: int, metrics_path: str):
    cfg = {"zero": {"stage": stage}, "co2": CO2, "metrics": {"progress": False}}
    # engine a also writes metrics (deferred records): the same bits as b, which writes none
    engines = [dtrain.wrap(make_model(), optimizer=optimizer_factory,
                           config={**cfg, "metrics": {"progress": False, "path": path}} if path else cfg)
               for path in (metrics_path, None, None)]
    for engine, chunk in zip(engines, (4096, 4096, 0)):  # 4 KiB: many chunks per shard; 0: one
        _co2(engine).chunk_bytes = chunk
    a, la = _train(cfg, steps, engine=engines[0])
    b, lb = _train(cfg, steps, blocking=True, engine=engines[1])
    whole, _ = _train(cfg, steps, engine=engines[2])
    co2 = _co2(a)
    shard = sum(t.numel() for t in co2.outer_state()["x_outer"])
    full = sum(u.padded for u in a.layout.unit_specs())
    sha_b, sha_whole = b.param_sha256(), whole.param_sha256()
    # an uneven collective (only the source sends; 1 MB, more than rank 0's start-up broadcasts): the
    # busiest rank of the run is rank 3, not rank 0
    a.comm.broadcast(torch.zeros(250_000), src=3, level="global")
    sent, co2_metrics = dict(a.comm.bytes_sent), co2.metrics()
    summary = a.close()
    return {"sha": (summary["param_sha256"], sha_b, sha_whole), "losses": (la, lb),
            "shard": shard, "full": full,
            "global_bytes": sent.get("global", 0), "metrics": co2_metrics, "sent": sent, "summary": summary,
            "plain": _train({"zero": {"stage": stage}}, 1)[0].param_sha256()}


def test_async_equals_blocking_reference_bit_exact(tmp_path):
    metrics = tmp_path / "m.jsonl"
    results = run_world(_async_vs_blocking, 4, 1, 7, str(metrics), nodes=2)
    # The summary's comm_bytes_total is, per level, the most any rank sent (docs/metrics.md)
    busiest = {lvl: max(r["sent"].get(lvl, 0) for r in results) for lvl in ("node", "global")}
    assert results[3]["sent"]["global"] > results[0]["sent"]["global"]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps, summary = [r for r in records if is_step_record(r)], records[-1]
    assert summary["summary"] and summary["comm_bytes_total"] == busiest
    assert all(r["summary"]["comm_bytes_total"] == busiest for r in results)
    assert [r["step"] for r in steps] == list(range(1, 8))
    shas = set()
    for r in results:
        assert r["sha"][0] == r["sha"][1], "overlapped outer sync differs from the blocking reference"
        assert r["sha"][0] == r["sha"][2], "chunking the outer all-reduce changed the result"
        assert r["losses"][0] == r["losses"][1]
        assert r["shard"] * 2 == r["full"], "outer state must be sharded over the node's 2 ranks"
        assert r["global_bytes"] > 0 and r["metrics"]["outer_rounds"] == 2
        shas.add(r["sha"][0])
    # node 0's ranks hold one local model, node 1's another (local progress since the last sync)
    assert results[0]["sha"][0] == results[1]["sha"][0]
    assert len(shas) == 2


def _clip_run(phi: float):
    cfg = {"co2": {"enabled": True, "local_steps": 2, "outer_momentum": 0.9, "outer_lr": 1.0,
                   "penalty": "off", "clip": phi, "overlap": False}}
    engine, _ = _train(cfg, 2)
    co2 = _co2(engine)
    st = co2.outer_state()
    m = torch.cat(st["momentum"])
    x0 = torch.cat([u.flatten_params(torch.device("cpu")) for u in _train({}, 0)[0].layout.units])
    return {"max": float(m.abs().max()), "at_bound": int((m.abs() == phi).sum()),
            "moved_ok": bool(torch.allclose(x0 - torch.cat(st["x_outer"]), m, atol=1e-7)),
            "n": m.numel()}


def test_outer_momentum_clip_is_in_place():
    phi = 1e-4
    for r in run_world(_clip_run, 2, phi, nodes=2):
        assert r["max"] <= phi, f"outer momentum {r['max']} exceeds clip {phi}: the clamp was not applied"
        assert r["at_bound"] > r["n"] // 10, "the test needs many elements beyond phi to mean anything"
        assert r["moved_ok"], "x_outer did not move by alpha * clipped momentum"


def _resume(directory: str, stage: int):
    cfg = {"zero": {"stage": stage}, "co2": {**CO2, "local_steps": 3}}
    full, _ = _train(cfg, 8)
    first, _ = _train(cfg, 5)  # step 5: the sync of round 1 (started at step 3) is in flight
    first.save(directory)
    second = dtrain.wrap(make_model(seed=7), optimizer=optimizer_factory, config=cfg)
    second.load(directory)
    assert second.step == 5
    _, tail = _train(cfg, 3, engine=second, start=5)
    return full.param_sha256(), second.param_sha256(), _co2(second).metrics()["outer_rounds"]


@pytest.mark.parametrize("stage", [0, 2])
def test_save_mid_round_resume_is_exact(tmp_path, stage):
    for full, resumed, rounds in run_world(_resume, 4, str(tmp_path), stage, nodes=2):
        assert full == resumed
        assert rounds == 1  # the round restored in flight was applied at step 6
