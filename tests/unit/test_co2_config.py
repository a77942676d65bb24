"""CO2 config section, its cross-section rules, and the outer step's pure formulas (no processes)."""
from types import SimpleNamespace

import pytest
import torch

from dtrain.config import Config, ConfigError
from dtrain.plugins.co2 import EPS, _Segments, gap_penalty, segment_sq_norms


def test_defaults_and_overrides():
    cfg = Config.load({"co2": {"enabled": True}}, overrides=["co2.local_steps=8", "co2.clip=0.01"])
    assert cfg.co2.local_steps == 8 and cfg.co2.clip == 0.01
    assert cfg.co2.penalty == "adaptive" and cfg.co2.intra_node_sync and cfg.co2.overlap
    assert Config.load({}).co2.enabled is False


@pytest.mark.parametrize("co2,zero,keys", [
    ({"enabled": True}, {"stage": 3}, ("co2.enabled", "zero.stage")),
    ({"enabled": True, "local_steps": 0}, {}, ("co2.enabled", "co2.local_steps")),
])
def test_incompatible_settings_name_both_keys(co2, zero, keys):
    with pytest.raises(ConfigError) as info:
        Config.load({"co2": co2, "zero": zero})
    for key in keys:
        assert key in str(info.value)


def test_co2_with_zero_1_and_2_is_fine():
    for stage in (0, 1, 2):
        Config.load({"co2": {"enabled": True}, "zero": {"stage": stage}})


@pytest.mark.parametrize("key,value", [("outer_lr", 0.0), ("outer_momentum", 1.0), ("clip", -1.0),
                                       ("local_steps", -2)])
def test_bad_values(key, value):
    with pytest.raises(ConfigError, match=f"co2.{key}"):
        Config.load({"co2": {key: value}})


def test_unknown_key():
    with pytest.raises(ConfigError, match="co2.tau"):
        Config.load({"co2": {"tau": 3}})


def test_zo2_rule_when_the_section_exists():
    cfg = Config.load({"co2": {"enabled": True}})
    cfg.zo2 = type("Zo2", (), {"enabled": True})()  # the zo2 section is another engineer's
    with pytest.raises(ConfigError, match="co2.enabled.*zo2.enabled"):
        cfg.validate()


def test_staleness_gap_penalty_by_hand():
    """Lambda_l = 1 + ||Delta_l|| / (||x_outer,l|| + eps), one value per parameter tensor l."""
    x_outer = torch.tensor([3.0, 4.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # 2 + 4, 2 pad
    delta = torch.tensor([0.3, 0.4, 0.5, -0.5, 0.5, -0.5, 0.0, 0.0], dtype=torch.float64)
    lengths = (2, 4)
    lam = gap_penalty(segment_sq_norms(delta, lengths), segment_sq_norms(x_outer, lengths))
    # ||Delta_1|| = 0.5, ||x_1|| = 5 -> 1.1;  ||Delta_2|| = 1, ||x_2|| = 2 -> 1.5
    assert lam.tolist() == pytest.approx([1 + 0.5 / (5 + EPS), 1 + 1 / (2 + EPS)], rel=0, abs=1e-15)
    assert lam.tolist() == pytest.approx([1.1, 1.5], abs=1e-8)


def test_shard_segments_follow_the_parameter_tensors():
    unit = SimpleNamespace(slots=[SimpleNamespace(offset=0, numel=3), SimpleNamespace(offset=3, numel=5),
                                  SimpleNamespace(offset=8, numel=2)])  # padded to 12
    assert _Segments.of(unit, 0, 12) == _Segments(0, (3, 5, 2), 2)
    assert _Segments.of(unit, 0, 6) == _Segments(0, (3, 3), 0)
    assert _Segments.of(unit, 6, 12) == _Segments(1, (2, 2), 2)
    assert _Segments.of(unit, 10, 12) == _Segments(3, (), 2)  # padding only


@pytest.mark.parametrize("raw,expected", [('"adaptive"', "adaptive"), ('"off"', "off"), ("2", 2.0), ("0.5", 0.5)])
def test_penalty_forms(raw, expected):
    assert Config.load({}, [f"co2.penalty={raw}"]).co2.penalty == expected


@pytest.mark.parametrize("raw,says", [("true", 'write co2.penalty = "adaptive" instead'),
                                      ("false", 'write co2.penalty = "off" instead'),
                                      ("0", "a positive number"), ("-1.5", "a positive number"),
                                      ('"constant"', "expected a float or 'off' or 'adaptive'")])
def test_penalty_errors_are_one_line(raw, says):
    with pytest.raises(ConfigError) as info:
        Config.load({}, [f"co2.penalty={raw}"])
    assert says in str(info.value) and "\n" not in str(info.value)
