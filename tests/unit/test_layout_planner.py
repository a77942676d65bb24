"""The zero-level planner's step-time model (dtrain/planner/layout.py; docs/hierarchical.md).

Pure arithmetic: the predicted step is compute + communication - overlap * min(the two), the
communication term is the volume formula priced per level, ``zero.preset = "auto"`` plans with the
units the zero layout really forms, and ``dtrain plan layout --tokens-per-step`` prints the step
and its parts. Exact equalities up to float rounding (rel 1e-12).
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dtrain.hierarchy import resolve_levels, step_volume
from dtrain.planner.cluster import ClusterSpec
from dtrain.planner.layout import StepModel, layout_units, plan_layouts, predict_step
from dtrain.topology import Shape

SHAPE = Shape.of(4, 0, 2)
CLUSTER = ClusterSpec(name="t", num_devices=4, devices_per_node=2, linear_TFLOPS=0.01, intra_node_GBps=1.0,
                      inter_node_GBps=0.1, intra_node_latency_us=100.0, inter_node_latency_us=1000.0,
                      calibration={"step_overhead_s": 0.05, "comm_overlap": 0.5})


def _levels(**kw):
    base = dict(stage=0, preset=None, params=None, grads=None, optim=None, backward_params=None)
    return resolve_levels(SimpleNamespace(**{**base, **kw}), SHAPE)


def test_step_model_arithmetic():
    m = StepModel.of(CLUSTER)
    assert (m.flops_per_s, m.step_overhead_s, m.overlap) == (1e10, 0.05, 0.5)
    assert m.compute_s(1e6, 1000) == pytest.approx(0.05 + 0.1, rel=1e-12)
    assert m.compute_s(1e6, 0) == 0.0  # no tokens: communication only
    # overhead 0.05, then forward 0.25/3 and backward 0.5/3 of compute; each phase hides half of min(c, m)
    assert m.step_s(0.3, {"forward": 0.05, "backward": 0.05}) == pytest.approx(0.3 + 0.1 - 0.05, rel=1e-12)
    assert m.step_s(0.3, {"update": 0.1}) == pytest.approx(0.4, rel=1e-12)  # publishing is never hidden
    assert StepModel(1.0, overlap=0.0).step_s(0.3, {"backward": 0.1}) == pytest.approx(0.4)  # plain sum
    full = StepModel(1.0, overlap=1.0)
    assert full.step_s(0.3, {"forward": 0.1, "backward": 0.2}) == pytest.approx(0.3)  # max, phase by phase
    # the same communication all in the backward hides only up to the backward's compute
    assert full.step_s(0.3, {"backward": 0.3}) == pytest.approx(0.4)
    uncalibrated = StepModel.of(ClusterSpec(name="u", num_devices=4, devices_per_node=2))
    assert (uncalibrated.step_overhead_s, uncalibrated.overlap) == (0.0, 0.0)


def test_predict_step_prices_the_volume_formula_per_level():
    units = [4096, 4096, 1024]
    hpz = _levels(preset="hpz")
    counts: dict[str, int] = {}
    volume = step_volume(units, hpz, SHAPE, backward_units=units[:-1], counts=counts)
    p = predict_step(units, hpz, SHAPE, CLUSTER, flops_per_token=1e6, tokens_per_rank=1000)
    comm = (volume["node"] / 1e9 + counts["node"] * 100e-6 + volume["global"] / 0.1e9 + counts["global"] * 1e-3)
    assert p["bytes_per_level"] == volume and p["comm_s"] == pytest.approx(comm, rel=1e-12)
    assert p["compute_s"] == pytest.approx(0.15, rel=1e-12)
    phases: dict = {}
    step_volume(units, hpz, SHAPE, backward_units=units[:-1], phases=phases)
    assert set(phases) == {"forward", "backward"}  # hpZ publishes nothing: params and optim share a level
    by_phase = {ph: sum(b / (1e9 if lvl == "node" else 0.1e9) + n * (100e-6 if lvl == "node" else 1e-3)
                        for lvl, (b, n) in per.items()) for ph, per in phases.items()}
    assert p["comm_s_by_phase"]["forward"] == pytest.approx(by_phase["forward"], rel=1e-12)
    assert p["comm_s_by_phase"]["backward"] == pytest.approx(by_phase["backward"], rel=1e-12)
    hidden = 0.5 * (min(0.1 / 3, by_phase["forward"]) + min(0.2 / 3, by_phase["backward"]))
    assert p["step_s"] == pytest.approx(0.15 + comm - hidden, rel=1e-12)
    # the ranking uses the step time; compute is the same for all, so with overlap 0 the order is comm's
    cands = plan_layouts(units, SHAPE, CLUSTER, flops_per_token=1e6, tokens_per_rank=1000)
    assert [c.time_s for c in cands] == sorted(c.time_s for c in cands)
    assert all(c.compute_s == pytest.approx(0.15) for c in cands)


def test_auto_plans_with_the_layouts_real_units(monkeypatch):
    import torch

    import dtrain
    from dtrain.models import GPT, GPTConfig
    from dtrain.planner import layout

    model = GPT(GPTConfig.preset("tiny", vocab_size=64))
    units = layout_units(model, SHAPE)
    assert len(units) == model.cfg.n_layer + 1 and all(u % 4 == 0 for u in units)  # one per block + root
    assert sum(units) >= sum(p.numel() for p in model.parameters())
    seen = {}

    def spy(u, shape, cluster, *a, **kw):
        seen["units"] = list(u)
        return real(u, shape, cluster, *a, **kw)

    real = layout.plan_layouts
    monkeypatch.setattr(layout, "plan_layouts", spy)
    layout.choose_levels(SimpleNamespace(model=model), SHAPE)
    assert seen["units"] == units
    # the same sizes as the units the zero layout builds (world 1, stage 3: padded to 1)
    engine = dtrain.wrap(GPT(GPTConfig.preset("tiny", vocab_size=64)),
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.1), config={"zero": {"stage": 3}})
    try:
        assert [u.padded for u in engine.layout.units] == layout_units(model, Shape.of(1, 0, 1))
    finally:
        engine.close()


def test_plan_layout_cli_prints_step_time(tmp_path, capsys):
    from dtrain.planner.cli import main

    path = tmp_path / "c.toml"
    path.write_text(CLUSTER.to_toml())
    argv = ["layout", "--model", "layers=4,hidden=128,heads=4,vocab=256,tied=1", "--cluster", str(path)]
    assert main([*argv, "--tokens-per-step", "4000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for c in out["candidates"]:
        # overlap 0.5 hides, phase by phase, at most half of the work after the 0.05 s overhead
        plain = c["predicted_compute_s"] + c["predicted_step_comm_s"]
        most_hidden = 0.5 * min(c["predicted_compute_s"] - 0.05, c["predicted_step_comm_s"])
        assert plain - most_hidden - 1e-12 <= c["predicted_step_s"] < plain
        assert c["predicted_compute_s"] > 0.05
    assert main([*argv, "--tokens-per-step", "-1"]) == 2
    assert "--tokens-per-step" in capsys.readouterr().err


def test_calibrate_layout_bad_input_is_one_line(capsys):
    from dtrain.planner.cli import main

    assert main(["calibrate", "--layout"]) == 2  # would overwrite the sequence-parallel calibration
    assert "--layout writes a cluster file of its own" in capsys.readouterr().err
    assert main(["calibrate", "--layout", "--nodes", "1", "--out", "/tmp/x.toml"]) == 2
    assert "at least 2 nodes of 2 ranks" in capsys.readouterr().err
    assert main(["calibrate", "--layout", "--net", "bw=fast", "--out", "/tmp/x.toml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fast" in err


def test_calibration_fits_compute_scale_and_overlap_over_assignments():
    """``fit_step_model`` recovers the compute scale and overlap that generated three assignments'
    step times (noiseless, on its grid: 0.01 steps), from communication split differently by phase."""
    from dtrain.planner.calibrate import fit_step_model

    rate, overhead, flops, tokens = 1e10, 0.02, 1e6, 200.0
    truth = StepModel(rate / 1.5, overhead, 0.4)
    compute = truth.compute_s(flops, tokens)
    phases = {"zero3": {"forward": 0.05, "backward": 0.08, "update": 0.0},
              "hpz": {"forward": 0.03, "backward": 0.04, "update": 0.0},
              "hsdp": {"forward": 0.0, "backward": 0.09, "update": 0.01}}
    measured = [(name, comm, truth.step_s(compute, comm)) for name, comm in phases.items()]
    scale, phi, fit = fit_step_model(rate, overhead, flops, tokens, measured)
    assert (scale, phi) == (1.5, 0.4)
    for name, comm, t in measured:
        assert fit[name]["predicted_s"] == pytest.approx(t, rel=1e-9)
