"""CO2 config section and its cross-section rules (no processes)."""
import pytest

from dtrain.config import Config, ConfigError


def test_defaults_and_overrides():
    cfg = Config.load({"co2": {"enabled": True}}, overrides=["co2.local_steps=8", "co2.clip=0.01"])
    assert cfg.co2.local_steps == 8 and cfg.co2.clip == 0.01
    assert cfg.co2.penalty and cfg.co2.intra_node_sync and cfg.co2.overlap
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
