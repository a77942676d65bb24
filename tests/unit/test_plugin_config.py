"""Plugin-owned config sections (issue 12, item 5) and the example plugin of docs/plugins.md.

Plugins here are defined in this test file, outside dtrain. The doc's example is extracted from
docs/plugins.md and executed, so the test fails when the documented example breaks. One engine at
world size 1 (no processes); the token count is an integer, compared exactly.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from dtrain.config import Config, ConfigError, register_section, registered_sections, require
from dtrain.plugins import Plugin, register

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "plugins.md"


@register
class Probe(Plugin):
    """A plugin defined outside dtrain, with a section of every supported shape."""

    name = "probe"
    slot = "observer.probe"

    @dataclass(kw_only=True)
    class Config:
        enabled: bool = False
        value: int = 1
        rate: float = 0.5
        tags: list[str] = field(default_factory=list)
        sizes: dict[str, int] = field(default_factory=dict)

        def validate(self) -> None:
            require(self.value >= 0, "probe.value", self.value, "an integer >= 0")


def test_plugin_section_loads_from_dict_overrides_toml_and_json(tmp_path):
    cfg = Config.load({"probe": {"value": 3}}, ["probe.rate=2", "probe.sizes.pair=2", 'probe.tags=["a"]'])
    assert (cfg.probe.value, cfg.probe.rate, cfg.probe.sizes, cfg.probe.tags) == (3, 2.0, {"pair": 2}, ["a"])
    assert Config.load().probe.value == 1  # defaults when the section is absent
    toml = tmp_path / "run.toml"
    toml.write_text("[probe]\nenabled = true\nvalue = 9\n[zero]\nstage = 1\n")
    cfg = Config.load(toml, ["probe.value=10"])
    assert (cfg.probe.enabled, cfg.probe.value, cfg.zero.stage) == (True, 10, 1)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"probe": {"value": 4}}))
    assert Config.load(js).probe.value == 4
    again = Config.load(Config.load(js))  # to_dict round trip carries plugin sections
    assert again.probe.value == 4 and again.to_dict()["probe"]["value"] == 4
    assert Probe.enabled(Config.load({}, ["probe.enabled=true"])) and not Probe.enabled(Config.load())


@pytest.mark.parametrize("data,overrides,message", [
    ({"probe": {"valu": 1}}, [], "unknown key 'probe.valu' in probe; allowed keys: enabled, rate, sizes, tags, value"),
    ({}, ["probe.valu=1"], "unknown key 'probe.valu' in probe;"),
    ({"probe": {"value": -1}}, [], "probe.value = -1 is not allowed; expected an integer >= 0"),
    ({"probe": {"value": "x"}}, [], "probe.value must be int, got str"),
    ({"probe": {"sizes": {"a": "b"}}}, [], "probe.sizes.a must be int, got str"),
    ({"probe": 3}, [], "probe must be a table"),
])
def test_errors_in_a_plugin_section_are_one_line_naming_the_key(data, overrides, message):
    with pytest.raises(ConfigError) as info:
        Config.load(data, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    # the same error whether or not unknown sections are deferred
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.load(data, overrides, defer_unknown_sections=True)


def test_unknown_sections_strict_deferred_and_near_misses():
    with pytest.raises(ConfigError, match=r"^unknown key 'later' in config; allowed keys: train, zero"):
        Config.load({"later": {"x": 1}})
    cfg = Config.load({"later": {"x": 1}}, ["later.y=2"], defer_unknown_sections=True)
    assert cfg.deferred_sections == {"later": {"x": 1, "y": 2}}
    assert cfg.to_dict()["later"] == {"x": 1, "y": 2}
    assert getattr(cfg, "later", None) is None and getattr(cfg, "never_registered", None) is None
    for name, near in [("zer", "zero"), ("snapshots", "snapshot"), ("prob", "probe"), ("co", "co2")]:
        with pytest.raises(ConfigError, match=rf"unknown section '{name}' in config; did you mean '{near}'\?"):
            Config.load({name: {}}, defer_unknown_sections=True)
    with pytest.raises(ConfigError, match="a plugin's section must be a table"):
        Config.load({}, ["stray=1"], defer_unknown_sections=True)

    # The rank registers the script's plugin after the launcher's load: the raw section is then
    # built and checked on first use (and by a strict reload of the same config).
    @dataclass(kw_only=True)
    class LaterConfig:
        x: int = 0
        y: int = 0

    register_section("later", LaterConfig)
    try:
        assert (cfg.later.x, cfg.later.y) == (1, 2) and cfg.deferred_sections == {}
        with pytest.raises(ConfigError, match=r"^unknown key 'later.z' in later; allowed keys: x, y$"):
            Config.load({"later": {"z": 1}}, defer_unknown_sections=True)  # registered now: checked at once
    finally:
        import dtrain.config as config_module

        del config_module._SECTIONS["later"]


def test_registration_rules():
    @dataclass
    class Other:
        a: int = 0

    with pytest.raises(ConfigError, match="'zero' is a core section"):
        register_section("zero", Other)
    with pytest.raises(ConfigError, match="section 'probe' is registered twice"):
        register_section("probe", Other)
    with pytest.raises(ConfigError, match="is not a dataclass"):
        register_section("plain", dict)
    assert {"co2", "snapshot", "probe"} <= set(registered_sections())
    with pytest.raises(ValueError, match="plugin name 'probe' is registered twice"):
        register(type("Impostor", (Plugin,), {"name": "probe"}))


def test_launcher_validation_path_is_torch_free_and_fast():
    """What `dtrain launch` needs before spawning: load + check a config without importing torch."""
    code = ("import sys, time; t = time.perf_counter()\n"
            "from dtrain.config import Config\n"
            "from dtrain.topology import Shape\n"
            "c = Config.load({'co2': {'enabled': True}, 'mine': {'k': 1}}, ['topology.levels.pair=2', "
            "'snapshot.every=2'], defer_unknown_sections=True)\n"
            "Shape.of(8, 0, 2, c.topology.levels)\n"
            "assert c.deferred_sections == {'mine': {'k': 1}} and c.snapshot.every == 2\n"
            "print(time.perf_counter() - t, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    seconds, torch_loaded = out.stdout.split()
    assert torch_loaded == "False" and float(seconds) < 2.0


def _doc_example() -> str:
    text = DOC.read_text()
    marker = text.index("<!-- example: tokens plugin")
    match = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert match, "docs/plugins.md lost its example block"
    return match.group(1)


def test_the_documented_example_plugin(tmp_path):
    """Run docs/plugins.md's plugin: registered, configured by --set, counted, checkpointed."""
    import dtrain
    from dtrain.runtime import shutdown

    source = _doc_example()
    assert 25 <= len(source.strip().splitlines()) <= 60
    module = types.ModuleType("docs_plugins_example")
    sys.modules[module.__name__] = module
    exec(compile(source, str(DOC), "exec"), module.__dict__)
    with pytest.raises(ConfigError, match=r"unknown key 'tokens.evry' in tokens; allowed keys: enabled, every"):
        Config.load({}, ["tokens.evry=2"])
    with pytest.raises(ConfigError, match=r"tokens.every = 0 is not allowed"):
        Config.load({}, ["tokens.every=0"])

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    overrides = ["tokens.enabled=true", "tokens.every=2"]
    try:
        engine = dtrain.wrap(model, lambda p: torch.optim.SGD(p, lr=0.1), loss_fn=lambda out, b: out.pow(2).mean(),
                             overrides=overrides)
        counter = next(p for p in engine.plugins if p.name == "tokens")
        for _ in range(3):
            engine.train_step(torch.ones(5, 4))  # 20 elements a step
        assert counter.metrics() == {"tokens_seen": 40.0} and counter.mine == 20  # summed at step 2
        engine.save(tmp_path / "ck" / "manual")
        engine.close()
        engine = dtrain.wrap(torch.nn.Linear(4, 1), lambda p: torch.optim.SGD(p, lr=0.1),
                             loss_fn=lambda out, b: out.pow(2).mean(), overrides=overrides)
        engine.load(tmp_path / "ck" / "manual")
        counter = next(p for p in engine.plugins if p.name == "tokens")
        engine.train_step(torch.ones(5, 4))
        assert counter.metrics() == {"tokens_seen": 80.0} and counter.mine == 0
        engine.close()
    finally:
        shutdown()
        sys.modules.pop(module.__name__, None)
