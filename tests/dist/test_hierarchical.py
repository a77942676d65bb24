"""Per-kind zero levels (docs/hierarchical.md) on 2 nodes x 2 ranks of real gloo groups.

One ``run_world`` trains every valid assignment of (params, grads, optim, backward_params) over
the levels rank < node < global (25 of them), two steps each with gradient accumulation 3 (one row per rank per micro-batch) and
global-norm clipping, and compares with single-process fp32 training on the same global batch.
During each assignment's second step it records the bytes the layout's own collectives send per
level (engine collectives such as the loss average are left out) and compares them with
:func:`dtrain.hierarchy.step_volume`: they must be equal, byte for byte.

Tolerance (the one of test_equivalence.py, same argument): parallel runs sum per-rank gradients in
another order (four addends here, in up to three steps), a few ulps per gradient; Adam normalises
the update, so after two steps at lr 3e-3 the drift is far below 1e-6. atol 2e-5 / rtol 1e-4 on
parameters and rel 1e-5 on losses sit an order of magnitude above that and orders below any real
bug (a wrong part, a stale backward copy, a missing average: ~lr = 3e-3 per step). The int8
all-gather is lossy by design (block-wise int8, relative error <= 1/254 of each block's largest
value, in the forward/backward only), and so is bf16 (8 bits of mantissa): their losses are
checked at rel 1e-2; Adam bounds every element's update by ~lr whatever the gradient, so the
parameters are checked at atol 2 lr per step, with fewer than 1% (bf16) or 5% (int8; observed
2.6%) of them off by more than 2e-3. A wrong dequantisation or part order garbles the forward and
fails the loss check by far.

Also here: co2 over HSDP (every kind sharded inside the node) equals co2 over node-level ZeRO-1
bit for bit; a checkpoint saved under hpZ loads under HSDP and ZeRO-1 with identical parameters;
the hpZ backward copy is never stale (it is rebuilt from each forward all-gather once that gather
completed; a copy the forward did not refresh, the ZeRO++ #5059 race injected by skipping the
refresh, is caught by the layout's version check before the backward reads it).
"""
from __future__ import annotations

import itertools
import sys

import pytest
import torch

from tests.dist.harness import run_world
from tests.dist.workloads import local_batch, make_model, optimizer_factory, reference_train

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]
STEPS, ACCUM, CLIP = 2, 3, 1.0
LEVELS = ("rank", "node", "global")


def valid_assignments() -> list[dict[str, str]]:
    size = {"rank": 1, "node": 2, "global": 4}
    out = []
    for p, g, o, b in itertools.product(LEVELS, repeat=4):
        if size[g] <= size[o] and size[p] <= size[o] and size[b] <= size[p]:
            out.append({"params": p, "grads": g, "optim": o, "backward_params": b})
    return out


def _layout_bytes(comm):
    """Wrap ``comm._issue`` so that collectives issued from the layout's code are also counted apart."""
    counted: dict[str, int] = {}
    issue = comm._issue

    def wrapper(op, level, peers, nbytes, async_op, launch):
        frame, mine = sys._getframe(1), False
        while frame is not None:
            if frame.f_code.co_filename.endswith("plugins/zero.py"):
                mine = True
                break
            frame = frame.f_back
        if mine:
            ranks = comm.group_ranks(level, peers)
            if len(ranks) > 1:
                name = comm.topology.shape.level_of_ranks(ranks)
                counted[name] = counted.get(name, 0) + nbytes
        return issue(op, level, peers, nbytes, async_op, launch)

    comm._issue = wrapper
    return counted, lambda: setattr(comm, "_issue", issue)


def _train(zero: dict, steps: int = STEPS, measure: bool = True) -> dict:
    import dtrain
    from dtrain.hierarchy import step_volume

    cfg = {"zero": zero, "train": {"grad_accum": ACCUM, "clip_grad_norm": CLIP}}
    engine = dtrain.wrap(make_model(), optimizer=optimizer_factory, config=cfg)
    rank, world = engine.runtime.rank, engine.runtime.world_size
    layout, losses, measured = engine.layout, [], None
    for s in range(steps):
        if measure and s == steps - 1:
            measured, restore = _layout_bytes(engine.comm)
        losses.append(float(engine.train_step(local_batch(s, rank, world))))
    if measure:
        restore()
    specs = layout.unit_specs()
    backward = [u.padded for u in specs if u.name != "<root>"]
    predicted = step_volume([u.padded for u in specs], layout.levels, engine.comm.topology.shape,
                            backward_units=backward, grad_accum=ACCUM, gather_dtype=layout.gather_dtype,
                            clip=True) if measure else None
    params = engine.full_parameters()  # collective
    out = {"losses": losses, "params": params if rank == 0 else None,
           "measured": measured, "predicted": predicted, "state": engine.state_bytes(), "engine": engine}
    return out


def _world() -> dict:
    import tempfile

    from dtrain.plugins import zero as zero_mod

    results: dict = {"assign": []}
    for levels in valid_assignments():
        run = _train(levels)
        run.pop("engine")
        results["assign"].append((levels, run))
    for dtype in ("bf16", "int8"):
        run = _train({"preset": "hpz", "gather_dtype": dtype})
        run.pop("engine")
        results[dtype] = run

    # save under hpZ, load under HSDP and ZeRO-1: the same parameters, bit for bit
    rank_dir = tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None
    holder = [rank_dir]
    torch.distributed.broadcast_object_list(holder, src=0)
    ckpt = f"{holder[0]}/ckpt"
    saved = _train({"preset": "hpz"}, measure=False)
    saved["engine"].save(ckpt)
    results["saved"] = saved["params"]
    for name, zero in (("hsdp", {"preset": "hsdp"}), ("zero1", {"stage": 1}),
                       ("mixed", {"params": "node", "grads": "rank", "optim": "global", "backward_params": "rank"})):
        import dtrain

        engine = dtrain.wrap(make_model(), optimizer=optimizer_factory,
                             config={"zero": zero, "train": {"grad_accum": ACCUM, "clip_grad_norm": CLIP}})
        engine.load(ckpt)
        params = engine.full_parameters()
        loss = float(engine.train_step(local_batch(STEPS, engine.runtime.rank, engine.runtime.world_size)))
        after = engine.full_parameters()
        first = engine.runtime.rank == 0
        results[f"loaded_{name}"] = {"params": params if first else None, "loss": loss,
                                     "after": after if first else None}

    # co2 over node-local sharding: HSDP's parts are exactly the node-level ZeRO-1 parts co2 syncs
    import dtrain

    for name, zero in (("co2_zero1", {"stage": 1}), ("co2_hsdp", {"preset": "hsdp"})):
        engine = dtrain.wrap(make_model(), optimizer=optimizer_factory, config={
            "zero": zero, "co2": {"enabled": True, "local_steps": 2, "intra_node_sync": True}})
        losses = [float(engine.train_step(local_batch(s, engine.runtime.rank, engine.runtime.world_size)))
                  for s in range(4)]
        results[name] = {"losses": losses, "sha": engine.param_sha256()}

    # the #5059 race: the backward copy is not refreshed from the forward gather before backward reads it
    original = zero_mod.FlatLayout._refresh_backward_copy
    zero_mod.FlatLayout._refresh_backward_copy = lambda self, unit: None
    try:
        _train({"preset": "hpz"}, measure=False)
        results["race"] = "not detected"
    except zero_mod.StaleCopyError as exc:
        results["race"] = str(exc)
    finally:
        zero_mod.FlatLayout._refresh_backward_copy = original
    return results


@pytest.fixture(scope="module")
def world_results():
    return run_world(_world, 4, nodes=2, timeout_s=540)


@pytest.fixture(scope="module")
def reference():
    return reference_train(STEPS + 1, grad_accum=ACCUM, clip=CLIP)


def _close(params, ref, atol=2e-5, rtol=1e-4, what=""):
    assert params.keys() == ref.keys()
    for name, value in ref.items():
        torch.testing.assert_close(params[name], value, atol=atol, rtol=rtol, msg=lambda m: f"{what} {name}: {m}")


def test_every_assignment_matches_single_process_and_the_volume_formula(world_results, reference):
    ref_losses, _ = reference
    _, ref_params = reference_train(STEPS, grad_accum=ACCUM, clip=CLIP)
    r0 = world_results[0]
    assert len(r0["assign"]) == 25
    for levels, run in r0["assign"]:
        assert run["losses"] == pytest.approx(ref_losses[:STEPS], rel=1e-5), levels
        _close(run["params"], ref_params, what=str(levels))
    for rank, result in enumerate(world_results):  # every rank sends what the formula says
        for levels, run in result["assign"]:
            assert run["measured"] == run["predicted"], (rank, levels)
    by = {tuple(l.values()): run for l, run in r0["assign"]}
    zero3 = by[("global", "global", "global", "global")]["measured"]
    hpz = by[("global", "global", "global", "node")]["measured"]
    hsdp = by[("node", "node", "node", "node")]["measured"]
    assert hpz["global"] < zero3["global"] and hsdp["global"] < hpz["global"]
    # state: ZeRO-1 holds the parameters once (no separate fp32 copy of its part)
    zero1 = by[("rank", "rank", "global", "rank")]["state"]
    ddp = by[("rank", "rank", "rank", "rank")]["state"]
    assert zero1["params"] == ddp["params"]


def test_quantised_gathers_train_close_to_fp32(world_results, reference):
    ref_losses, _ = reference
    _, ref_params = reference_train(STEPS, grad_accum=ACCUM, clip=CLIP)
    for dtype in ("bf16", "int8"):
        run = world_results[0][dtype]
        assert run["measured"] == run["predicted"], dtype
        assert run["losses"] == pytest.approx(ref_losses[:STEPS], rel=1e-2), dtype
        # Adam moves each element by at most ~lr per step whatever the gradient: a few elements whose
        # tiny gradient changed sign under the lossy forward differ by up to 2 lr per step
        _close(run["params"], ref_params, atol=2 * 3e-3 * STEPS, rtol=0, what=dtype)
        diffs = torch.cat([(run["params"][n] - v).abs().reshape(-1) for n, v in ref_params.items()])
        assert (diffs > 2e-3).float().mean() < {"bf16": 0.01, "int8": 0.05}[dtype], dtype
    runs = {tuple(l.values()): run["measured"] for l, run in world_results[0]["assign"]}
    flat, hpz = runs[("global",) * 4], runs[("global", "global", "global", "node")]
    int8 = world_results[0]["int8"]["measured"]
    assert int8["global"] < 0.7 * hpz["global"] and int8["global"] < 0.2 * flat["global"]


def test_checkpoint_moves_between_assignments(world_results, reference):
    ref_losses, _ = reference
    r0 = world_results[0]
    for name in ("hsdp", "zero1", "mixed"):
        loaded = r0[f"loaded_{name}"]
        for pname, value in r0["saved"].items():
            assert torch.equal(loaded["params"][pname], value), (name, pname)
        assert loaded["loss"] == pytest.approx(ref_losses[STEPS], rel=1e-5), name
    _close(r0["loaded_hsdp"]["after"], r0["loaded_zero1"]["after"], what="hsdp vs zero1 after resume")


def test_co2_composes_with_node_local_sharding(world_results):
    """co2's outer sync across nodes, each rank syncing only its part of HSDP's node-sharded state:
    the same bits as co2 over node-level ZeRO-1 (same parts, same sums)."""
    for result in world_results:
        assert result["co2_hsdp"] == result["co2_zero1"]


def test_stale_backward_copy_is_detected(world_results):
    for result in world_results:
        assert result["race"].startswith("unit ") and "ZeRO++ #5059" in result["race"], result["race"]


def _batch16(step: int, rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(7 + step)
    x = torch.randint(0, 256, (16, 17), generator=g).chunk(world)[rank]
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def _world8() -> dict:
    import dtrain
    from dtrain.hierarchy import step_volume

    out = {}
    for name, zero in (("frontier3", {"preset": "frontier3"}),
                       ("mixed", {"params": "pair", "grads": "node", "optim": "global", "backward_params": "rank"})):
        engine = dtrain.wrap(make_model(), optimizer=optimizer_factory,
                             config={"zero": zero, "topology": {"levels": {"pair": 2}}})
        losses = []
        for s in range(2):
            if s == 1:
                measured, restore = _layout_bytes(engine.comm)
            losses.append(float(engine.train_step(_batch16(s, engine.runtime.rank, 8))))
        restore()
        specs = engine.layout.unit_specs()
        predicted = step_volume([u.padded for u in specs], engine.layout.levels, engine.comm.topology.shape,
                                backward_units=[u.padded for u in specs if u.name != "<root>"])
        params = engine.full_parameters()
        out[name] = {"losses": losses, "measured": measured, "predicted": predicted,
                     "params": params if engine.runtime.rank == 0 else None}
    return out


@pytest.mark.slow
def test_pair_level_at_world_eight():
    """A declared pair level inside nodes of 4 (world 8): frontier3 and params at pair with grads at
    node, against single-process training (same tolerance) and the formula (exact, every rank).
    The level steps here include peers of pair inside a node (groups built for the layout)."""
    model = make_model()
    opt = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    ref = []
    for s in range(2):
        opt.zero_grad()
        loss = model(**_batch16(s, 0, 1))
        loss.backward()
        opt.step()
        ref.append(loss.item())
    results = run_world(_world8, 8, nodes=2, timeout_s=540)
    for name, run in results[0].items():
        assert run["losses"] == pytest.approx(ref, rel=1e-5), name
        _close(run["params"], {n: p.detach() for n, p in model.named_parameters()}, what=name)
        assert "pair" in run["measured"]
    for result in results:
        for name, run in result.items():
            assert run["measured"] == run["predicted"], name
