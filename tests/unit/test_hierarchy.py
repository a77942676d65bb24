"""Per-kind zero levels without processes: the rules (one-line ConfigErrors, caught by `dtrain
launch`'s preflight), the presets, the nesting of each rank's parts, and properties of the volume
formula. Its exact agreement with measured bytes is checked in tests/dist/test_hierarchical.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from dtrain.config import ConfigError
from dtrain.hierarchy import chain_index, resolve_levels, step_volume
from dtrain.launch.preflight import check_config_up_front
from dtrain.topology import Shape


def zero(stage: int = 0, **levels):
    return SimpleNamespace(stage=stage, preset=levels.pop("preset", None), **{
        k: levels.get(k) for k in ("params", "grads", "optim", "backward_params")})


SHAPE4 = Shape.of(4, 0, 2)
SHAPE8 = Shape.of(8, 0, 2, {"pair": 2})


@pytest.mark.parametrize("levels, words", [
    (dict(grads="global", optim="node"), "zero.grads = 'global' (4 ranks) is larger than zero.optim = 'node'"),
    (dict(params="global", optim="node", grads="node"), "the fp32 parameters are the optimizer's master values"),
    (dict(stage=3, backward_params="global", params="node", grads="node", optim="node"),
     "zero.backward_params = 'global' (4 ranks) is larger than zero.params = 'node'"),
    (dict(params="rack"), "zero.params = 'rack' is not a topology level"),
])
def test_invalid_assignments_are_one_line(levels, words):
    stage = levels.pop("stage", 0)
    with pytest.raises(ConfigError) as info:
        resolve_levels(zero(stage, **levels), SHAPE4)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_preflight_rejects_an_invalid_assignment_before_any_rank():
    with pytest.raises(ConfigError, match="zero.grads = 'global'"):
        check_config_up_front(None, ["zero.grads=global", "zero.optim=node"], nodes=2, nproc=2)
    with pytest.raises(ConfigError, match="zero.preset"):
        check_config_up_front(None, ["zero.preset=zero4"], nodes=2, nproc=2)
    check_config_up_front(None, ["zero.preset=hpz"], nodes=2, nproc=2)


def test_stages_and_presets_expand_to_levels():
    assert resolve_levels(zero(3), SHAPE4).as_dict() == dict(params="global", grads="global", optim="global",
                                                             backward_params="global")
    assert resolve_levels(zero(1), SHAPE4).as_dict() == dict(params="rank", grads="rank", optim="global",
                                                             backward_params="rank")
    hpz = resolve_levels(zero(preset="hpz"), SHAPE4)
    assert hpz.as_dict() == dict(params="global", grads="global", optim="global", backward_params="node")
    assert hpz.describe() == ("zero.preset = 'hpz' -> params=global, grads=global, optim=global, "
                              "backward_params=node")
    assert resolve_levels(zero(preset="hsdp"), SHAPE4).optim == "node"
    assert resolve_levels(zero(preset="frontier3"), SHAPE8).as_dict() == dict(
        params="node", grads="node", optim="global", backward_params="pair")
    # an explicit kind wins over the preset
    assert resolve_levels(zero(preset="hpz", backward_params="rank"), SHAPE4).backward_params == "rank"


def test_parts_nest_across_levels():
    """A rank's part at every level in use lies inside its part at each smaller level (world 8)."""
    chain = [1, 2, 4, 8]
    padded = 64
    for rank in range(8):
        ranges = {s: (chain_index(rank, s, chain) * padded // s, (chain_index(rank, s, chain) + 1) * padded // s)
                  for s in chain}
        for small, big in zip(chain, chain[1:]):
            assert ranges[small][0] <= ranges[big][0] and ranges[big][1] <= ranges[small][1], (rank, small, big)
    for s in chain:  # every level's parts tile the unit inside each block
        assert sorted(chain_index(r, s, chain) for r in range(s)) == list(range(s))
    assert [chain_index(r, 4, [1, 4]) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]  # one level: rank % size


def test_volume_formula_properties():
    units = [4096 * 8] * 6
    flat = step_volume(units, resolve_levels(zero(3), SHAPE4), SHAPE4)
    hpz = step_volume(units, resolve_levels(zero(preset="hpz"), SHAPE4), SHAPE4)
    hsdp = step_volume(units, resolve_levels(zero(preset="hsdp"), SHAPE4), SHAPE4)
    assert set(flat) == {"global"}
    assert hpz["global"] <= 0.67 * flat["global"]
    assert hsdp["global"] <= 0.4 * flat["global"]
    # flat ZeRO-3 per rank: forward + backward all-gather and a reduce-scatter, (n-1)/n of 4P each
    p = sum(units)
    assert flat["global"] == 3 * 3 * 4 * p // 4
    ddp = step_volume(units, resolve_levels(zero(0), SHAPE4), SHAPE4)
    assert ddp == {"global": 2 * 3 * 4 * p // 4}
    # a pair level at world 8: frontier3's backward gathers stay inside pairs
    f3 = step_volume(units, resolve_levels(zero(preset="frontier3"), SHAPE8), SHAPE8)
    assert set(f3) == {"pair", "node", "global"}


def test_plan_layout_and_memory_cli(capsys):
    import json

    from dtrain.planner.cli import main

    assert main(["layout", "--model", "7b", "--cluster", "cluster/a100_8x8.toml", "--memory-gb", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cands = out["candidates"]
    assert out["choice"] == cands[0] and cands[0]["feasible"]
    assert all(c["memory_bytes_per_rank"] <= 40e9 for c in cands if c["feasible"])
    feasible = [c["predicted_step_comm_s"] for c in cands if c["feasible"]]
    assert feasible[0] == min(feasible)
    assert len(cands) == len({tuple(c[k] for k in ("params", "grads", "optim", "backward_params")) for c in cands})
    assert main(["layout", "--model", "7b", "--memory-gb", "0.001"]) == 2
    assert "no assignment fits" in capsys.readouterr().err
    assert main(["memory", "--model", "7b", "--set", "zero.stage=3", "--json"]) == 0
    mem = json.loads(capsys.readouterr().out)["bytes_per_rank"]["device"]
    p = 6738149376 // 64 * 64  # 7b's parameters, as the planner counts them
    assert abs(mem["params"] - 4 * p / 64) < 64 and abs(mem["optim"] - 8 * p / 64) < 64
    assert main(["memory", "--model", "7b", "--set", "zero.grads=global", "--set", "zero.optim=node"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zero.grads = 'global'" in err


def test_auto_preset_picks_a_valid_assignment():
    from dtrain.planner.layout import choose_levels
    from tests.dist.workloads import make_model

    chosen = choose_levels(SimpleNamespace(model=make_model()), SHAPE4)
    levels = resolve_levels(zero(preset="auto"), SHAPE4, auto=chosen)
    assert levels.as_dict() == chosen


def test_auto_preset_weighs_compute_when_given_the_tokens_per_step(monkeypatch):
    """``zero.auto_tokens_per_step`` reaches the planner as tokens per rank and 6 FLOPs per
    trainable parameter per token; 0 leaves the compute term out; a bad value is one line."""
    import dtrain.planner.layout as layout
    from dtrain.config import ConfigError, ZeroConfig
    from tests.dist.workloads import make_model

    model = make_model()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seen = []
    real = layout.plan_layouts
    monkeypatch.setattr(layout, "plan_layouts", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    for tokens in (0, 4096):
        engine = SimpleNamespace(config=SimpleNamespace(zero=ZeroConfig(preset="auto", auto_tokens_per_step=tokens)))
        layout.choose_levels(SimpleNamespace(model=model, engine=engine), SHAPE4)
    assert seen[0]["flops_per_token"] == 0.0 and seen[0]["tokens_per_rank"] == 0.0
    assert seen[1]["flops_per_token"] == 6.0 * n and seen[1]["tokens_per_rank"] == 4096 / 4
    with pytest.raises(ConfigError, match="zero.auto_tokens_per_step"):
        ZeroConfig(auto_tokens_per_step=-1).validate()
