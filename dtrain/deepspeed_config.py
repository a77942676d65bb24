"""The DeepSpeed bridge: a DeepSpeed JSON config translated into dtrain config data (torch-free).

Every DeepSpeed key gets one of four treatments (docs/deepspeed.md has the table):

* **mapped** onto a dtrain key (``zero_optimization.stage`` -> ``zero.stage``, ...). A mapping that
  is not one-to-one (hpZ's partition size becomes a declared topology level) adds a note to the
  warning line saying what it became;
* **ignored**: the key only tunes speed, memory layout or logging of DeepSpeed's own implementation
  and dtrain has no such knob or always does the equivalent (``overlap_comm``: dtrain always
  overlaps). Ignored keys are listed in ONE warning line;
* **rejected**: the key would change what is trained (fp16 loss scaling, the optimizer, the data
  schedule) or asks for a feature dtrain lacks; one line per key naming what to use instead;
* a key at its DeepSpeed "off" value (``enabled: false``, ``zero_hpz_partition_size: 1``, offload
  device ``none``) is accepted without comment, whatever its treatment when on.

``"auto"`` (the Hugging Face Trainer fills it in from its own arguments) means *not set*: dtrain's
default, the script or ``--set`` decide; such keys are named in the warning line. Keys DeepSpeed
does not know are rejected.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from dtrain.config import Config, ConfigError

__all__ = ["from_deepspeed", "translate", "Translation", "to_overrides", "launch_overrides"]

AUTO = "auto"
log = logging.getLogger("dtrain")


@dataclass
class Translation:
    """The result of translating one DeepSpeed config."""

    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    """dtrain config data: ``{"zero": {"stage": 2}, "train": {...}}``."""
    ignored: list[str] = field(default_factory=list)
    """DeepSpeed keys accepted and ignored (tuning or logging only)."""
    auto: list[str] = field(default_factory=list)
    """DeepSpeed keys set to "auto": left to dtrain's defaults."""
    notes: list[str] = field(default_factory=list)
    """What a mapping that is not one-to-one became (``zero_hpz_partition_size`` -> a declared level)."""
    train_batch_size: int | None = None
    """DeepSpeed's global batch size, recorded to check against micro x accum x world."""
    batch_checked: bool = False
    source: str = "deepspeed config"

    def warning(self) -> str | None:
        """The one warning line, or None when nothing was ignored or left to defaults."""
        parts = [f"mapped {note}" for note in self.notes]
        if self.ignored:
            parts.append(f"ignored (DeepSpeed tuning/logging, no dtrain equivalent): {', '.join(self.ignored)}")
        if self.auto:
            parts.append(f"'auto' left to dtrain's defaults: {', '.join(self.auto)}")
        if self.train_batch_size is not None and not self.batch_checked:
            parts.append(f"train_batch_size = {self.train_batch_size} not checked (the world size is not known "
                         f"here; dtrain launch checks it)")
        return f"{self.source}: " + "; ".join(parts) if parts else None


class _Walk:
    """State of one translation: the result so far and the problems found (one line each)."""

    def __init__(self, source: str) -> None:
        self.result = Translation(source=source)
        self.problems: list[str] = []

    def set(self, dtrain_key: str, value: Any) -> None:
        """``set("topology.levels.hpz", 16)`` -> ``{"topology": {"levels": {"hpz": 16}}}``."""
        *sections, key = dtrain_key.split(".")
        node = self.result.data
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value

    def reject(self, ds_key: str, message: str) -> None:
        self.problems.append(f"{self.result.source}: {ds_key}: {message}")

    def visit(self, table: Mapping[str, "Handler"], prefix: str, section: Mapping[str, Any]) -> None:
        for name, value in section.items():
            key = f"{prefix}{name}"
            handler = table.get(name)
            if handler is None:
                self.reject(key, "not a DeepSpeed key dtrain knows; remove it (see docs/deepspeed.md)")
            elif isinstance(value, str) and value == AUTO and handler is not _optimizer and handler is not _scheduler:
                self.result.auto.append(key)
            else:
                handler(self, key, value)


Handler = Callable[[_Walk, str, Any], None]


# ------------------------------------------------------------------ handler building blocks
def _ignore(walk: _Walk, key: str, value: Any) -> None:
    walk.result.ignored.append(key)


def _silent(walk: _Walk, key: str, value: Any) -> None:
    """Accepted without comment: the key is off, or what dtrain always does."""


def _reject(message: str) -> Handler:
    def handler(walk: _Walk, key: str, value: Any) -> None:
        walk.reject(key, message)
    return handler


def _unless(is_off: Callable[[Any], bool], handler: Handler) -> Handler:
    """``handler`` only when the value turns something on; an off value is accepted silently."""
    def guarded(walk: _Walk, key: str, value: Any) -> None:
        if not is_off(value):
            handler(walk, key, value)
    return guarded


def _off(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == v and type(value) is type(v) for v in values)


def _int(key: str, value: Any, minimum: int) -> int:
    """DeepSpeed writes sizes as 5e8: integral floats are integers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise ConfigError(f"{value!r} is not allowed; expected an integer >= {minimum}")
    return int(value)


def _maps(dtrain_key: str, convert: Callable[[str, Any], Any] | None = None) -> Handler:
    def handler(walk: _Walk, key: str, value: Any) -> None:
        try:
            walk.set(dtrain_key, convert(key, value) if convert else value)
        except ConfigError as exc:
            walk.reject(key, str(exc))
    return handler


def _positive_int(key: str, value: Any) -> int:
    return _int(key, value, 1)


def _switched(on_enable: Handler) -> Handler:
    """A DeepSpeed section with an ``enabled`` switch (off by default, as in DeepSpeed): off (false,
    absent, or "auto") accepts everything in it silently; on calls ``on_enable`` with the section."""
    def handler(walk: _Walk, key: str, value: Any) -> None:
        if not isinstance(value, Mapping):
            walk.reject(key, f"expected a section (a JSON object), got {value!r}")
            return
        enabled = value.get("enabled", False)
        if enabled == AUTO:
            walk.result.auto.append(f"{key}.enabled")
        elif enabled:
            on_enable(walk, f"{key}.enabled", value)
    return handler


# ------------------------------------------------------------------ mapped keys
def _clip(walk: _Walk, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        walk.reject(key, f"expected a number >= 0, got {value!r}")
    elif value > 0:  # DeepSpeed's 0 means no clipping, dtrain's default
        walk.set("train.clip_grad_norm", float(value))


def _bf16_on(walk: _Walk, key: str, value: Any) -> None:
    walk.set("train.precision", "bf16")
    walk.visit(_BF16, key.rsplit(".", 1)[0] + ".", value)


def _torch_autocast(walk: _Walk, key: str, value: Any) -> None:
    dtype = str(value.get("dtype", "bfloat16")).removeprefix("torch.")
    if dtype in ("bfloat16", "bf16"):
        walk.set("train.precision", "bf16")
    else:
        walk.reject(key, f"autocast to {dtype} is not available; dtrain autocasts to bf16 only "
                    f"(train.precision = \"bf16\")")
    extra = sorted(set(value) - {"enabled", "dtype"})
    walk.result.ignored.extend(f"{key.rsplit('.', 1)[0]}.{k}" for k in extra)


def _stage(walk: _Walk, key: str, value: Any) -> None:
    if value in (0, 1, 2, 3) and not isinstance(value, bool):
        walk.set("zero.stage", int(value))
    else:
        walk.reject(key, f"{value!r} is not a ZeRO stage; use 0, 1, 2 or 3")


_FP32_BYTES = 4
_MIB = 2 ** 20


def _reduce_bucket(walk: _Walk, key: str, value: Any) -> None:
    """DeepSpeed counts elements; dtrain buckets fp32 gradients by MiB, for stages 0-2 only (stage 3
    reduces per gather unit), so under stage 3 the key has nothing to tune."""
    try:
        elements = _int(key, value, 1)
    except ConfigError as exc:
        walk.reject(key, str(exc))
        return
    walk.set("zero.bucket_mb", elements * _FP32_BYTES / _MIB)


def _prefetch_bucket(walk: _Walk, key: str, value: Any) -> None:
    if value == 0 and not isinstance(value, bool):  # 0 turns prefetching off; any size is tuning
        walk.set("zero.prefetch", False)
    else:
        walk.result.ignored.append(key)


# ------------------------------------------------------------------ optimizer and scheduler
_TORCH_OPTIMIZERS = {name.lower(): name for name in (
    "SGD", "Adam", "AdamW", "Adamax", "Adadelta", "Adagrad", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop",
    "SparseAdam", "LBFGS", "Adafactor")}
_DEEPSPEED_ONLY_PARAMS = ("torch_adam", "adam_w_mode", "bias_correction", "set_grad_none")


def _literal(name: str, value: Any) -> str:
    """A Python literal for a generated code line; "auto" becomes an upper-case placeholder."""
    if value == AUTO:
        return name.upper()
    if isinstance(value, list):
        return repr(tuple(value))
    return repr(value)


def _kwargs(params: Mapping[str, Any]) -> str:
    return "".join(f", {k}={_literal(k, v)}" for k, v in params.items())


def _placeholders(params: Mapping[str, Any]) -> str:
    names = [k.upper() for k, v in params.items() if v == AUTO]
    return f" (fill in the 'auto' placeholders {', '.join(names)})" if names else ""


def _optimizer(walk: _Walk, key: str, value: Any) -> None:
    if not isinstance(value, Mapping) or "type" not in value:
        walk.reject(key, "expected {\"type\": ..., \"params\": {...}}; in dtrain your script builds the optimizer: "
                    "pass optimizer=lambda p: torch.optim.AdamW(p, ...) to dtrain.wrap")
        return
    name, params = str(value["type"]), dict(value.get("params") or {})
    lower = name.lower()
    if lower in ("adam", "adamw"):
        decoupled = params.get("adam_w_mode", True) or lower == "adamw"
        torch_name = "AdamW" if decoupled else "Adam"
        params.setdefault("weight_decay", 0.0)  # DeepSpeed's default; torch's AdamW would use 0.01
    elif lower in _TORCH_OPTIMIZERS:
        torch_name = _TORCH_OPTIMIZERS[lower]
    else:
        walk.reject(key, f"{name} has no torch.optim equivalent; pass your own factory, optimizer=lambda p: ..., "
                    f"to dtrain.wrap (under zero.stage >= 1 it must be element-wise, like AdamW)")
        return
    caveat = ("; note torch's Adam always corrects bias (bias_correction: false has no torch equivalent)"
              if params.get("bias_correction") is False else "")
    for k in _DEEPSPEED_ONLY_PARAMS:
        params.pop(k, None)
    code = f"optimizer=lambda p: torch.optim.{torch_name}(p{_kwargs(params)})"
    walk.reject(key, f"{name}: the script builds the optimizer in dtrain: pass {code} to dtrain.wrap"
                f"{_placeholders(params)}{caveat}")


def _num(params: Mapping[str, Any], name: str, default: Any) -> str:
    value = params.get(name, default)
    return name.upper() if value == AUTO else repr(value)


def _warmup_gamma(params: Mapping[str, Any]) -> tuple[str, str]:
    """DeepSpeed's warmup fraction after ``s`` scheduler steps, and its warmup length N."""
    steps = params.get("warmup_num_steps", 1000)
    n = "WARMUP_NUM_STEPS" if steps == AUTO else repr(max(2, int(steps)))
    if params.get("warmup_type", "log") == "linear":
        return f"min(1.0, s / {n})", n
    return f"(math.log(s + 1) / math.log({n}) if s < {n} else 1.0)", n


def _scheduler_code(name: str, params: Mapping[str, Any]) -> tuple[str, str] | None:
    """(LambdaLR factor expression in ``s``, what the optimizer's lr must be), or None."""
    gamma, n = _warmup_gamma(params)
    if name in ("WarmupLR", "WarmupDecayLR"):
        lo, hi = _num(params, "warmup_min_lr", 0.0), _num(params, "warmup_max_lr", 0.001)
        if name == "WarmupDecayLR":
            total = _num(params, "total_num_steps", AUTO)
            gamma = f"({gamma} if s < {n} else max(0.0, ({total} - s) / max(1, {total} - {n})))"
        factor = gamma if lo in ("0", "0.0") else f"({lo} + ({hi} - {lo}) * {gamma}) / {hi}"
        return factor, f"warmup_max_lr ({hi})"
    if name == "WarmupCosineLR":
        wmin, cmin = _num(params, "warmup_min_ratio", 0.0), _num(params, "cos_min_ratio", 0.0001)
        total = _num(params, "total_num_steps", AUTO)
        factor = (f"({wmin} + (1 - {wmin}) * {gamma} if s < {n} else max(0.0, {cmin} + (1 - {cmin}) * "
                  f"(1 + math.cos(math.pi * (s - {n} + 1) / ({total} - {n}))) / 2))")
        return factor, "the peak lr"
    if name == "LRRangeTest":
        rate, size = _num(params, "lr_range_test_step_rate", 1.0), _num(params, "lr_range_test_step_size", 2000)
        interval = f"((s + 1) // {size})" if params.get("lr_range_test_staircase") else f"((s + 1) / {size})"
        return f"1 + {rate} * {interval}", f"lr_range_test_min_lr ({_num(params, 'lr_range_test_min_lr', 0.001)})"
    return None


def _scheduler(walk: _Walk, key: str, value: Any) -> None:
    if not isinstance(value, Mapping) or "type" not in value:
        walk.reject(key, "expected {\"type\": ..., \"params\": {...}}; in dtrain the script builds the scheduler: "
                    "pass scheduler=lambda opt: ... to dtrain.wrap")
        return
    name, params = str(value["type"]), dict(value.get("params") or {})
    built = _scheduler_code(name, params)
    if name == "OneCycle":
        code = (f"scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, "
                f"max_lr={_num(params, 'cycle_max_lr', AUTO)}, total_steps=TOTAL_STEPS)")
        walk.reject(key, f"OneCycle: the closest torch schedule is {code}; pass it to dtrain.wrap")
    elif built is None:
        walk.reject(key, f"{name} is not a DeepSpeed scheduler dtrain knows; pass your own "
                    f"scheduler=lambda opt: ... to dtrain.wrap")
    else:
        factor, lr = built
        code = f"scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: {factor})"
        needs_math = "; import math" if "math." in factor else ""
        walk.reject(key, f"{name}: the script builds the scheduler in dtrain: pass {code} to dtrain.wrap, with "
                    f"the optimizer's lr set to {lr}{needs_math}{_placeholders(params)}")


# ------------------------------------------------------------------ hierarchical levels (docs/hierarchical.md)
HPZ_LEVEL = "hpz"
MICS_LEVEL = "mics"
"""Names of the topology levels the bridge declares. DeepSpeed gives a group size in ranks, and the
bridge does not know the ranks per node (the launcher's business), so it declares a level of exactly
that size; when a node has that many ranks its blocks are the node's."""


def _declare_level(walk: _Walk, key: str, value: Any, level: str, kinds: tuple[str, ...], what: str) -> None:
    try:
        size = _int(key, value, 2)
    except ConfigError as exc:
        walk.reject(key, str(exc))
        return
    walk.set(f"topology.levels.{level}", size)
    for kind in kinds:
        walk.set(f"zero.{kind}", level)
    targets = ", ".join(f'zero.{kind} = "{level}"' for kind in kinds)
    walk.result.notes.append(f"{key} = {size} -> topology.levels.{level} = {size}, {targets} ({what} over blocks "
                             f"of {size} ranks; the same blocks as \"node\" when a node has {size} ranks)")


def _hpz(walk: _Walk, key: str, value: Any) -> None:
    _declare_level(walk, key, value, HPZ_LEVEL, ("backward_params",), "hpZ's secondary parameter copy")


def _mics(walk: _Walk, key: str, value: Any) -> None:
    _declare_level(walk, key, value, MICS_LEVEL, ("params", "grads", "optim"), "MiCS's partition groups")


def _int8_gather(walk: _Walk, key: str, value: Any) -> None:
    if value is True:
        walk.set("zero.gather_dtype", "int8")
    else:
        walk.reject(key, f"expected true or false, got {value!r}")


# ------------------------------------------------------------------ offload tier (docs/offload.md)
_OFFLOAD_TIERS = {"cpu": "host", "nvme": "nvme"}
_PARAM_OFFLOAD = ('parameter offload is not mapped from a DeepSpeed config; remove the key and set '
                  'offload.params = "nvme" with zero.stage = 3 in dtrain\'s config (CPU devices; optimizer state '
                  'offload, offload_optimizer or cpu_offload, does map)')


def _offload_off(value: Any) -> bool:
    return not value or (isinstance(value, Mapping) and str(value.get("device", "none")).lower() == "none")


def _offload_optimizer(walk: _Walk, key: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        walk.reject(key, f"expected a section (a JSON object), got {value!r}")
        return
    device = str(value.get("device", "none")).lower()
    tier = _OFFLOAD_TIERS.get(device)
    if tier is None:
        walk.reject(f"{key}.device", f"{device!r} is not an offload device; use cpu, nvme or none")
        return
    walk.set("offload.enabled", True)
    walk.set("offload.optim", tier)
    if tier == "nvme":
        path = value.get("nvme_path")
        if not isinstance(path, str) or not path or path == AUTO:
            walk.reject(f"{key}.nvme_path", f"{path!r}: device nvme needs a directory on a local disk "
                        f"(it becomes offload.dir)")
        else:
            walk.set("offload.dir", path)
    walk.visit(_OFFLOAD_OPTIMIZER, f"{key}.", value)


def _cpu_offload(walk: _Walk, key: str, value: Any) -> None:
    if value is True:
        walk.set("offload.enabled", True)
        walk.set("offload.optim", "host")
    else:
        walk.reject(key, f"expected true or false, got {value!r}")


_OFFLOAD_OPTIMIZER: dict[str, Handler] = {
    "device": _silent,  # read by _offload_optimizer
    "nvme_path": _silent,
    # sizes and pipelining dtrain derives itself (docs/offload.md: the staging pool is never the user's to size)
    **{name: _ignore for name in ("pin_memory", "buffer_count", "pipeline_read", "pipeline_write", "fast_init")},
    "ratio": _unless(_off(1, 1.0), _reject(
        "partial optimizer offload is not available: dtrain applies one tier to every unit; remove the key")),
}


# ------------------------------------------------------------------ the key tables
_ZERO_TUNING = (  # speed/memory knobs of DeepSpeed's implementation: dtrain overlaps, buckets and frees by itself
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter", "contiguous_gradients",
    "use_multi_rank_bucket_allreduce", "load_from_fp32_weights", "elastic_checkpoint", "sub_group_size",
    "stage3_param_persistence_threshold", "stage3_model_persistence_threshold", "stage3_max_live_parameters",
    "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "stage3_module_granularity_threshold",
    "stage3_use_all_reduce_for_fetch_params", "ignore_unused_parameters", "legacy_stage1", "round_robin_gradients",
    "grad_hooks", "memory_efficient_linear", "override_module_apply", "pipeline_loading_checkpoint",
    "log_trace_cache_warnings", "cpu_offload_use_pin_memory", "aio",
)

_ZERO: dict[str, Handler] = {
    "stage": _stage,
    "reduce_bucket_size": _reduce_bucket,
    "stage3_prefetch_bucket_size": _prefetch_bucket,
    **{name: _ignore for name in _ZERO_TUNING},
    "zero_quantized_gradients": _unless(_off(False), _reject(
        "quantized gradient reduction is not available: dtrain reduces gradients in fp32; remove the key")),
    "zero_quantized_nontrainable_weights": _unless(_off(False), _reject(
        "quantized frozen weights are not available; remove the key")),
    "zeropp_loco_param": _unless(_off(), _reject("LoCo (ZeRO++ quantized gradients) is not available; remove it")),
    "zero_hpz_partition_size": _unless(_off(1, 0), _hpz),
    "mics_shard_size": _unless(_off(-1, 0), _mics),
    "mics_hierarchical_params_gather": _unless(_off(False), _ignore),  # dtrain gathers level by level itself
    "zero_quantized_weights": _unless(_off(False), _int8_gather),
    "offload_optimizer": _unless(_offload_off, _offload_optimizer),
    "cpu_offload": _unless(_off(False), _cpu_offload),
    "offload_param": _unless(_offload_off, _reject(_PARAM_OFFLOAD)),
    "cpu_offload_param": _unless(_off(False), _reject(_PARAM_OFFLOAD)),
}

_STAGE3_ONLY = {"zero_hpz_partition_size": "backward_params", "mics_shard_size": "params"}
"""Keys that split ZeRO-3's parameters, and the zero key each one sets."""

_BF16: dict[str, Handler] = {
    "enabled": _silent,
    "immediate_grad_update": _ignore,
    "check_grad_overflow": _ignore,
    "bf16_master_weights_and_grads": _unless(_off(False), _reject(
        "dtrain keeps fp32 master weights and gradients under bf16; remove the key")),
    "bf16_optimizer_states": _unless(_off(False), _reject(
        "dtrain keeps the optimizer state in fp32; remove the key")),
}

_FP16 = _reject('fp16 training (loss scaling) is not available; use bf16: "bf16": {"enabled": true}, '
                'i.e. train.precision = "bf16"')


def _not_available(what: str, instead: str) -> Handler:
    return _reject(f"{what} is not available in dtrain; {instead}")


def _comm_dtype(walk: _Walk, key: str, value: Any) -> None:
    if str(value).lower() not in ("fp32", "float32", "torch.float32"):
        walk.reject(key, f"{value!r}: dtrain reduces gradients in fp32; remove the key")


def _data_types(walk: _Walk, key: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        walk.reject(key, f"expected a section (a JSON object), got {value!r}")
    else:
        walk.visit({"grad_accum_dtype": _comm_dtype}, f"{key}.", value)


def _zero(walk: _Walk, key: str, value: Any) -> None:
    if isinstance(value, bool):  # DeepSpeed's deprecated form: true = stage 1
        walk.set("zero.stage", int(value))
        return
    if not isinstance(value, Mapping):
        walk.reject(key, f"expected a section (a JSON object), got {value!r}")
        return
    walk.visit(_ZERO, f"{key}.", value)
    zero = walk.result.data.get("zero", {})
    if zero.get("stage") != 3:
        for name, kind in _STAGE3_ONLY.items():
            if kind in zero:
                walk.reject(f"{key}.{name}", f"splits ZeRO-3's parameters, so it needs \"stage\": 3 (stage is "
                            f"{zero.get('stage', 'not set')}); set it or remove the key")
    if zero.get("stage") == 3 and "bucket_mb" in zero:
        del walk.result.data["zero"]["bucket_mb"]  # stage 3 reduces per gather unit: nothing to tune
        walk.result.ignored.append(f"{key}.reduce_bucket_size")


def _record_batch(walk: _Walk, key: str, value: Any) -> None:
    try:
        walk.result.train_batch_size = _int(key, value, 1)
    except ConfigError as exc:
        walk.reject(key, str(exc))


_MONITORING = ("flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet", "timers",
               "autotuning", "monitor_config")

_TOP: dict[str, Handler] = {
    "train_batch_size": _record_batch,
    "train_micro_batch_size_per_gpu": _maps("train.micro_batch_size", _positive_int),
    "gradient_accumulation_steps": _maps("train.grad_accum", _positive_int),
    "gradient_clipping": _clip,
    "zero_optimization": _zero,
    "bf16": _switched(_bf16_on),
    "bfloat16": _switched(_bf16_on),
    "fp16": _switched(_FP16),
    "amp": _switched(_reject('apex AMP is not available; use bf16: "bf16": {"enabled": true}')),
    "torch_autocast": _switched(_torch_autocast),
    "optimizer": _optimizer,
    "scheduler": _scheduler,
    "communication_data_type": _comm_dtype,
    "data_types": _data_types,
    "sparse_gradients": _unless(_off(False), _not_available("sparse gradient reduction", "remove the key")),
    # logging, profiling and tuning: nothing trained changes
    **{name: _ignore for name in (
        "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "prescale_gradients",
        "gradient_predivide_factor", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
        "disable_allgather", "dataloader_drop_last", "activation_checkpointing", "checkpoint", "aio", "nebula",
        "graph_harvesting", "compile", "seq_parallel_comm_data_type", "use_data_before_expert_parallelism",
        *_MONITORING)},
    "elasticity": _switched(_not_available(
        "DeepSpeed elastic batch sizing", "for elastic jobs use dtrain launch --max-restarts and (Ray) --min-nodes")),
    "pipeline": _not_available("pipeline parallelism", "remove the section"),
    "tensor_parallel": _not_available("tensor parallelism", "remove the section"),
    "sequence_parallel_size": _unless(_off(1), _not_available(
        "Ulysses sequence parallelism", "the FlexSP runtime (issue 16) will cover long sequences")),
    "hybrid_engine": _switched(_not_available("the hybrid (RLHF) engine", "remove the section")),
    **{name: _switched(_not_available(what, "remove the section")) for name, what in (
        ("progressive_layer_drop", "progressive layer drop"), ("eigenvalue", "eigenvalue-based MoQ"),
        ("curriculum_learning", "curriculum learning (put it in your data pipeline)"),
        ("data_efficiency", "data efficiency (put it in your data pipeline)"))},
    **{name: _not_available(what, "remove the section") for name, what in (  # present = on
        ("sparse_attention", "sparse attention"), ("compression_training", "compression training"),
        ("quantize_training", "quantize training (MoQ)"), ("weight_quantization", "weight quantization"))},
}


# ------------------------------------------------------------------ batch sizes
def check_batch_size(train_batch_size: int, micro: int | None, accum: int, world_size: int,
                     source: str = "deepspeed config") -> None:
    """DeepSpeed's rule: train_batch_size = micro-batch x accumulation steps x world size."""
    if micro is not None and train_batch_size != micro * accum * world_size:
        raise ConfigError(
            f"{source}: train_batch_size = {train_batch_size} but train.micro_batch_size ({micro}) x "
            f"train.grad_accum ({accum}) x world size ({world_size}) = {micro * accum * world_size}; "
            f"make them agree (or drop train_batch_size)")


def _resolve_batch(walk: _Walk, world_size: int | None) -> None:
    """Fill in the missing one of micro-batch / accumulation as DeepSpeed does, then check."""
    total, train = walk.result.train_batch_size, walk.result.data.get("train", {})
    if total is None or walk.problems:
        return
    micro, accum = train.get("micro_batch_size"), train.get("grad_accum")
    where = f"{walk.result.source}: train_batch_size"
    if world_size is None:
        if micro is not None and accum is not None and total % (micro * accum):
            walk.problems.append(f"{where} = {total} is not a multiple of train_micro_batch_size_per_gpu ({micro}) "
                                 f"x gradient_accumulation_steps ({accum}): no world size fits")
        return
    if micro is None:
        per_step = world_size * (accum or 1)
        if total % per_step:
            walk.problems.append(f"{where} = {total} does not split over {world_size} ranks x {accum or 1} "
                                 f"accumulation steps; give train_micro_batch_size_per_gpu or change the size")
            return
        micro = total // per_step
        walk.set("train.micro_batch_size", micro)
    if accum is None:
        if total % (micro * world_size):
            walk.problems.append(f"{where} = {total} is not a multiple of train_micro_batch_size_per_gpu ({micro}) "
                                 f"x world size ({world_size})")
            return
        accum = total // (micro * world_size)
        if accum != 1:
            walk.set("train.grad_accum", accum)
    try:
        check_batch_size(total, micro, accum, world_size, walk.result.source)
    except ConfigError as exc:
        walk.problems.append(str(exc))
    walk.result.batch_checked = True


# ------------------------------------------------------------------ entry points
def _read(source: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    if isinstance(source, Mapping):
        return dict(source), "deepspeed config"
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {str(path)!r} must hold a JSON object")
    return data, path.name


def translate(source: Mapping[str, Any] | str | os.PathLike, world_size: int | None = None) -> Translation:
    """Translate a DeepSpeed config; raise one ConfigError listing every problem, one line each.

    With ``world_size`` the batch sizes are resolved and checked as DeepSpeed does; without it
    ``train_batch_size`` is only recorded (and checked for divisibility).
    """
    data, name = _read(source)
    walk = _Walk(name)
    walk.visit(_TOP, "", data)
    _resolve_batch(walk, world_size)
    if walk.problems:
        raise ConfigError("\n".join(walk.problems))
    try:
        Config.load(walk.result.data)
    except ConfigError as exc:  # a mapped value dtrain does not allow (e.g. a stage 7)
        raise ConfigError(f"{name}: {exc}") from None
    return walk.result


def from_deepspeed(source: Mapping[str, Any] | str | os.PathLike, *, world_size: int | None = None) -> dict[str, Any]:
    """dtrain config data (for :meth:`dtrain.Config.load`) from a DeepSpeed JSON config path or dict.

    Logs one warning line naming the keys ignored or left to defaults; raises :class:`ConfigError`
    with one line per key dtrain cannot honour, each saying what to use instead.
    """
    result = translate(source, world_size)
    warning = result.warning()
    if warning:
        log.warning(warning)
    return result.data


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"cannot pass {value!r} as a setting")
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # strings and lists of strings: JSON's syntax is TOML's here


def to_overrides(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"zero": {"stage": 2}}`` -> ``["zero.stage=2"]``: the form ``--set`` passes to the ranks
    (nested tables become dotted keys: ``topology.levels.hpz=16``)."""
    overrides = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            overrides.extend(to_overrides(value, f"{prefix}{key}."))
        else:
            overrides.append(f"{prefix}{key}={_toml_literal(value)}")
    return overrides


def launch_overrides(path: str, world_size: int, config_path: str | None,
                     overrides: list[str]) -> tuple[list[str], str | None]:
    """For ``dtrain launch --deepspeed-config``: the overrides every rank gets (the mapped settings
    first, so the command line's ``--set`` wins) and the warning line, after checking the merged
    config and the batch sizes at this world size."""
    result = translate(path, world_size)
    merged = to_overrides(result.data) + list(overrides)
    cfg = Config.load(config_path, merged)
    if result.train_batch_size is not None:
        check_batch_size(result.train_batch_size, cfg.train.micro_batch_size, cfg.train.grad_accum, world_size,
                         result.source)
    return merged, result.warning()
