"""Config loading: dict / TOML / JSON, overrides, and errors that name the key."""
import json

import pytest

from dtrain.config import Config, ConfigError, parse_override


def test_defaults_and_dict():
    cfg = Config.load({"zero": {"stage": 3}, "train": {"grad_accum": 2, "clip_grad_norm": 1}})
    assert cfg.zero.stage == 3 and cfg.train.grad_accum == 2
    assert cfg.train.clip_grad_norm == 1.0 and isinstance(cfg.train.clip_grad_norm, float)
    assert Config.load().zero.stage == 0


def test_toml_json_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[zero]\nstage = 2\n[train]\nprecision = "bf16"\n')
    cfg = Config.load(toml, ["zero.stage=3", "metrics.path=out.jsonl", "train.clip_grad_norm=0.5"])
    assert (cfg.zero.stage, cfg.train.precision, cfg.metrics.path) == (3, "bf16", "out.jsonl")
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"zero": {"stage": 1}}))
    assert Config.load(js).zero.stage == 1
    assert Config.load(Config.load(js)).zero.stage == 1


@pytest.mark.parametrize("data,match", [
    ({"zero": {"stag": 3}}, r"unknown key 'zero.stag' in zero; allowed keys: auto_tokens_per_step, backward_params, bucket_mb, gather_dtype, grads, malloc_keep_mb, optim, params, prefetch, preset, stage, sync_buffers, unit_classes"),
    ({"zeroo": {}}, r"unknown key 'zeroo' in config"),
    ({"zero": {"stage": "3"}}, r"zero.stage must be int, got str"),
    ({"zero": {"stage": 4}}, r"zero.stage = 4 is not allowed; expected 0 \(ddp\), 1, 2 or 3"),
    ({"zero": {"stage": True}}, r"zero.stage must be int"),
    ({"train": {"grad_accum": 0}}, r"train.grad_accum = 0 is not allowed"),
    ({"train": {"precision": "fp16"}}, r"train.precision = 'fp16' is not allowed; choose one of \['fp32', 'bf16'\]"),
    ({"train": {"clip_grad_norm": -1.0}}, r"train.clip_grad_norm"),
    ({"comm": {"timeout_s": 0}}, r"comm.timeout_s"),
    ({"checkpoint": {"every": 5}}, r"checkpoint.dir = None is not allowed; expected a directory path"),
    ({"zero": 3}, r"zero must be a table"),
    ({"zero": {"sync_buffers": "avg"}}, r"zero.sync_buffers = 'avg' is not allowed; choose one of \['rank0', 'mean', 'none'\]"),
])
def test_bad_configs_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        Config.load(data)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[zero\n")
    with pytest.raises(ConfigError, match="not valid toml"):
        Config.load(bad)
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        Config.load({}, ["zero.stage"])
    with pytest.raises(ConfigError, match="unknown key 'zero.nope'"):
        Config.load({}, ["zero.nope=1"])


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("a.b=some/path") == (["a", "b"], "some/path")
