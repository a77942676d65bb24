"""The DeepSpeed bridge on configs from DeepSpeed's own docs (tests/data/deepspeed/README.md).

Checks what each doc config maps to (ZeRO++ hpZ / qwZ and ZeRO-Infinity's optimizer offload
included, validated by ``Config.load`` and by the level rules on a world they fit), that every key dtrain cannot honour is one error line naming
the DeepSpeed key, that the generated optimizer/scheduler code runs and follows DeepSpeed's
documented schedule, the batch-size rule, and that ``dtrain launch --deepspeed-config`` rejects a
bad config up front (exit 2, one line per problem). No process group: this file runs in seconds.
"""
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtrain.config import Config, ConfigError
from dtrain.deepspeed_config import from_deepspeed, launch_overrides, to_overrides, translate
from dtrain.hierarchy import check_zero_config
from dtrain.launch.cli import main
from dtrain.topology import Shape

DATA = Path(__file__).resolve().parents[1] / "data" / "deepspeed"
ROOT = Path(__file__).resolve().parents[2]
BUCKET_5E8_MB = 5e8 * 4 / 2**20  # 5e8 fp32 elements
PARAM_OFFLOAD = ('parameter offload is not mapped from a DeepSpeed config; remove the key and set '
                 'offload.params = "nvme" with zero.stage = 3')


def _errors(source, world_size=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        translate(source, world_size)
    return str(info.value).splitlines()


def test_zero_tutorial_configs_map(caplog):
    cfg = Config.from_deepspeed(DATA / "zero1.json")
    assert (cfg.zero.stage, cfg.zero.bucket_mb) == (1, BUCKET_5E8_MB)
    with caplog.at_level(logging.WARNING, logger="dtrain"):
        data = from_deepspeed(DATA / "zero2.json")
    assert data == {"zero": {"stage": 2, "bucket_mb": BUCKET_5E8_MB}}
    assert len(caplog.records) == 1  # ONE warning line naming every ignored key
    warning = caplog.records[0].getMessage()
    assert "\n" not in warning
    for key in ("overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_bucket_size"):
        assert f"zero_optimization.{key}" in warning


def test_bf16_batch_and_clipping_map():
    cfg = Config.from_deepspeed(DATA / "bf16_zero2.json", world_size=2)
    t = cfg.train
    assert (t.micro_batch_size, t.grad_accum, t.clip_grad_norm, t.precision) == (2, 2, 1.0, "bf16")
    assert cfg.zero.stage == 2
    assert Config.from_deepspeed(DATA / "bf16_zero2.json", overrides=["zero.stage=3"]).zero.stage == 3
    (line,) = _errors(DATA / "bf16_zero2.json", world_size=4)
    assert "train_batch_size = 8 but train.micro_batch_size (2) x train.grad_accum (2) x world size (4) = 16" in line
    assert "not checked" in translate(DATA / "bf16_zero2.json").warning()  # recorded, checked at launch


@pytest.mark.parametrize("name,expected", [
    ("getting_started.json", [("optimizer", "torch.optim.AdamW(p, lr=0.00015, weight_decay=0.0)"),
                              ("fp16.enabled", 'train.precision = "bf16"')]),
    ("zero_infinity.json", [("zero_optimization.offload_param", PARAM_OFFLOAD)]),
    ("zeropp.json", [("zero_optimization.zero_quantized_gradients", "not available")]),
    ("bert_pld.json", [("optimizer", "torch.optim.AdamW(p, lr=0.001, weight_decay=0.01)"),
                       ("fp16.enabled", "use bf16"), ("progressive_layer_drop.enabled", "not available")]),
    ("hf_zero3_nvme_auto.json", [("optimizer", "AdamW(p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)"),
                                 ("scheduler", "LambdaLR"), ("zero_optimization.offload_param", PARAM_OFFLOAD)]),
])
def test_doc_configs_rejected_key_by_key(name, expected):
    lines = _errors(DATA / name)
    assert len(lines) == len(expected), lines
    for line, (key, hint) in zip(lines, expected):
        assert line.startswith(f"{name}: {key}: "), line
        assert hint in line, line


def test_hf_auto_values_are_left_to_defaults():
    data = json.loads((DATA / "hf_zero3_nvme_auto.json").read_text())
    for key in ("optimizer", "scheduler"):
        del data[key]
    del data["zero_optimization"]["offload_param"]
    result = translate(data)
    assert result.data == {"zero": {"stage": 3}, "offload": {"enabled": True, "optim": "nvme", "dir": "/local_nvme"}}
    assert Config.load(result.data).offload.dir == "/local_nvme"
    for key in ("pin_memory", "buffer_count", "fast_init"):  # sizes dtrain derives itself: the one warning line
        assert f"zero_optimization.offload_optimizer.{key}" in result.ignored
    assert result.auto == ["fp16.enabled", "zero_optimization.reduce_bucket_size",
                           "zero_optimization.stage3_prefetch_bucket_size",
                           "zero_optimization.stage3_param_persistence_threshold", "gradient_accumulation_steps",
                           "gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu"]
    assert "zero_optimization.aio" in result.ignored and "steps_per_print" in result.ignored
    assert "'auto' left to dtrain's defaults" in result.warning()


def test_generated_optimizer_and_scheduler_code_runs_and_follows_deepspeed():
    line = _errors({"optimizer": {"type": "Adam", "params": {"lr": 0.01, "betas": [0.8, 0.99]}},
                    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01,
                                                                  "warmup_num_steps": 10, "warmup_type": "linear"}}})
    opt_code = line[0].split("pass ", 1)[1].split(" to dtrain.wrap")[0]
    sched_code = line[1].split("pass ", 1)[1].split(" to dtrain.wrap")[0]
    assert "lr set to warmup_max_lr (0.01)" in line[1]
    scope = {"torch": torch, "math": math}
    exec(opt_code, scope)
    exec(sched_code, scope)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = scope["optimizer"]([p])
    assert isinstance(opt, torch.optim.AdamW)  # DeepSpeed's Adam defaults to adam_w_mode
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.01, (0.8, 0.99), 0.0)
    sched = scope["scheduler"](opt)
    seen = []
    for _ in range(13):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # DeepSpeed's WarmupLR (docs): min + (max - min) * s / N during warmup, then max.
    want = [0.001 + 0.009 * min(1.0, s / 10) for s in range(13)]
    assert seen == pytest.approx(want, rel=1e-12)
    # DeepSpeed's docs: log warmup over N = 5 steps, then linear decay to 0 at T = 20 / cosine to
    # cos_min_ratio; the factor multiplies the optimizer's lr (warmup_max_lr / the peak lr).
    warm = [math.log(s + 1) / math.log(5) for s in range(5)]
    decay = warm + [max(0.0, (20 - s) / 15) for s in range(5, 25)]
    cosine = warm + [max(0.0, 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * (s - 4) / 15)) / 2) for s in range(5, 25)]
    for kind, want in (("WarmupDecayLR", decay), ("WarmupCosineLR", cosine)):
        (line,) = _errors({"scheduler": {"type": kind, "params": {"total_num_steps": 20, "warmup_num_steps": 5,
                                                                   "warmup_max_lr": 0.1}}})
        exec(line.split("pass ", 1)[1].split(" to dtrain.wrap")[0], scope)
        opt = torch.optim.SGD([p], lr=0.1)
        sched = scope["scheduler"](opt)
        seen = []
        for _ in range(25):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert seen == pytest.approx([0.1 * f for f in want], rel=1e-12, abs=1e-15), kind


@pytest.mark.parametrize("config,match", [
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage: 7 is not a ZeRO stage; use 0, 1, 2 or 3"),
    ({"zero_optimization": {"stgae": 2}}, "zero_optimization.stgae: not a DeepSpeed key"),
    ({"trian_batch_size": 8}, "trian_batch_size: not a DeepSpeed key"),
    ({"train_micro_batch_size_per_gpu": 0},
     "train_micro_batch_size_per_gpu: 0 is not allowed; expected an integer >= 1"),
    ({"gradient_accumulation_steps": 1.5}, "gradient_accumulation_steps: 1.5 is not allowed"),
    ({"amp": {"enabled": True}}, "amp.enabled: apex AMP is not available; use bf16"),
    ({"communication_data_type": "bf16"}, "communication_data_type: 'bf16': dtrain reduces gradients in fp32"),
    ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}},
     "bf16.bf16_master_weights_and_grads: dtrain keeps fp32 master weights"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}, "optimizer: Lamb has no torch.optim equivalent"),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
     "train_batch_size = 30 is not a multiple of"),
])
def test_bad_values_name_the_deepspeed_key(config, match):
    (line,) = _errors(config)
    assert match in line, line


def test_off_values_and_batch_inference():
    quiet = translate({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 1,
                                             "offload_param": {"device": "none"}, "offload_optimizer": None,
                                             "stage3_prefetch_bucket_size": 0},
                       "fp16": {"enabled": False, "loss_scale": 0}, "bf16": {"enabled": True},
                       "gradient_clipping": 0.0, "sparse_gradients": False, "elasticity": {"enabled": False}})
    assert quiet.data == {"zero": {"stage": 3, "prefetch": False}, "train": {"precision": "bf16"}}
    assert quiet.warning() is None
    inferred = translate({"train_batch_size": 32, "gradient_accumulation_steps": 2}, world_size=4)
    assert inferred.data["train"] == {"grad_accum": 2, "micro_batch_size": 4}
    inferred = translate({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2}, world_size=4)
    assert inferred.data["train"] == {"micro_batch_size": 2, "grad_accum": 4}
    assert translate({"zero_optimization": True}).data == {"zero": {"stage": 1}}  # DeepSpeed's old form
    # under stage 3 dtrain reduces per gather unit: reduce_bucket_size has nothing to tune
    assert translate({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1e7}}).data == {"zero": {"stage": 3}}


def _without(name: str, key: str) -> dict:
    data = json.loads((DATA / name).read_text())
    del data["zero_optimization"][key]
    return data


def test_zeropp_maps_to_levels_and_int8_gathers():
    result = translate(_without("zeropp.json", "zero_quantized_gradients"))
    assert result.data == {"zero": {"stage": 3, "gather_dtype": "int8", "backward_params": "hpz"},
                           "topology": {"levels": {"hpz": 16}}}
    # the bridge cannot know the ranks per node, so it declares a level of 16 ranks and says so
    assert 'mapped zero_optimization.zero_hpz_partition_size = 16 -> topology.levels.hpz = 16, ' \
           'zero.backward_params = "hpz"' in result.warning()
    cfg = Config.load({}, to_overrides(result.data))  # the launcher's route: nested tables as dotted keys
    assert cfg == Config.load(result.data)
    for nodes in (2, 4):  # 32 ranks: the hpz blocks are the nodes (2 x 16) or span two nodes (4 x 8)
        levels = check_zero_config(cfg.zero, Shape.of(32, 0, nodes, cfg.topology.levels))
        sizes = [levels.size(kind) for kind in ("params", "grads", "optim", "backward_params")]
        assert sizes == [32, 32, 32, 16]
    mics = translate({"zero_optimization": {"stage": 3, "mics_shard_size": 8, "mics_hierarchical_params_gather": True}})
    assert mics.data == {"zero": {"stage": 3, "params": "mics", "grads": "mics", "optim": "mics"},
                         "topology": {"levels": {"mics": 8}}}
    assert mics.ignored == ["zero_optimization.mics_hierarchical_params_gather"]
    levels = check_zero_config(Config.load(mics.data).zero, Shape.of(16, 0, 2, {"mics": 8}))
    assert [levels.size(k) for k in ("params", "grads", "optim", "dp")] == [8, 8, 8, 16]


def test_optimizer_offload_maps_and_param_offload_is_one_line():
    result = translate(_without("zero_infinity.json", "offload_param"))
    assert result.data == {"zero": {"stage": 3}, "offload": {"enabled": True, "optim": "host"}}
    assert Config.load(result.data).offload.enabled
    legacy = translate({"zero_optimization": {"stage": 2, "cpu_offload": True}}).data
    assert legacy == {"zero": {"stage": 2}, "offload": {"enabled": True, "optim": "host"}}
    for key, value in (("offload_param", {"device": "cpu"}), ("offload_param", {"device": "nvme", "nvme_path": "/x"}),
                       ("cpu_offload_param", True)):
        (line,) = _errors({"zero_optimization": {"stage": 3, key: value}})
        assert line.startswith(f"deepspeed config: zero_optimization.{key}: {PARAM_OFFLOAD}"), line


@pytest.mark.parametrize("zero,match", [
    ({"stage": 2, "zero_hpz_partition_size": 8},
     'zero_optimization.zero_hpz_partition_size: splits ZeRO-3\'s parameters, so it needs "stage": 3 (stage is 2)'),
    ({"mics_shard_size": 8}, 'zero_optimization.mics_shard_size: splits ZeRO-3\'s parameters'),
    ({"stage": 3, "zero_hpz_partition_size": 2.5}, "zero_hpz_partition_size: 2.5 is not allowed"),
    ({"stage": 3, "offload_optimizer": {"device": "nvme"}},
     "zero_optimization.offload_optimizer.nvme_path: None: device nvme needs a directory"),
    ({"stage": 3, "offload_optimizer": {"device": "gpu"}},
     "zero_optimization.offload_optimizer.device: 'gpu' is not an offload device; use cpu, nvme or none"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}},
     "zero_optimization.offload_optimizer.ratio: partial optimizer offload is not available"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu", "bufer_count": 4}},
     "zero_optimization.offload_optimizer.bufer_count: not a DeepSpeed key"),
])
def test_bad_hierarchy_and_offload_values_are_one_line(zero, match):
    (line,) = _errors({"zero_optimization": zero})
    assert match in line, line


def test_overrides_round_trip_and_set_wins():
    data = translate(DATA / "bf16_zero2.json", world_size=2).data
    assert Config.load({}, to_overrides(data)) == Config.load(data)
    merged, warning = launch_overrides(str(DATA / "bf16_zero2.json"), 2, None, ["zero.stage=3"])
    cfg = Config.load(None, merged)
    assert (cfg.zero.stage, cfg.train.precision, cfg.train.micro_batch_size) == (3, "bf16", 2)
    assert "overlap_comm" in warning and "not checked" not in warning
    with pytest.raises(ConfigError, match=r"x train.grad_accum \(4\) x world size \(2\) = 16"):
        launch_overrides(str(DATA / "bf16_zero2.json"), 2, None, ["train.grad_accum=4"])


def test_launch_rejects_a_deepspeed_config_up_front(tmp_path, capsys):
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('a rank started')\n")
    start = time.monotonic()
    rc = main(["launch", "--nproc", "2", "--deepspeed-config", str(DATA / "zeropp.json"), str(script)])
    assert rc == 2 and time.monotonic() - start < 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["error: zeropp.json: zero_optimization.zero_quantized_gradients: quantized gradient reduction "
                     "is not available: dtrain reduces gradients in fp32; remove the key"]
    assert main(["launch", "--deepspeed-config", str(tmp_path / "missing.json"), str(script)]) == 2
    assert "error: DeepSpeed config" in capsys.readouterr().err


def test_bridge_is_torch_free():
    code = ("import sys, dtrain.deepspeed_config as d; d.translate({'zero_optimization': {'stage': 2}}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
