"""The typed configuration tree: loading from dict / TOML / JSON, `a.b=v` overrides, validation.

Every section is a dataclass. Loading walks the dataclass fields, so an unknown key, a value of
the wrong type or an impossible value is a :class:`ConfigError` that names the full key
(``zero.stage``) and says what is allowed. Cross-section rules (incompatible plugins) live in
:meth:`Config.validate`, which runs after every load.

The core sections (train, zero, comm, topology, metrics, checkpoint) are fields of
:class:`Config`. Every other section belongs to a plugin: :func:`register_section` (called by
``dtrain.plugins.register`` for a plugin's nested ``Config`` dataclass) makes ``name`` a section,
reachable as ``config.<name>``. The built-in plugins keep their section dataclasses in torch-free
modules (:data:`BUILTIN_SECTION_MODULES`) so that this module, and the launcher that validates a
config before any rank starts, never import torch. Writing a plugin: docs/plugins.md.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


@dataclass(kw_only=True)
class TrainConfig:
    """Options of the common trainer."""

    grad_accum: int = 1
    """Micro-batches per optimizer step; ``train_step`` splits its batch along dim 0."""
    clip_grad_norm: float | None = None
    """Global L2 norm to clip gradients to (across all shards); None disables clipping."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 = autocast compute in bfloat16 with fp32 master weights and fp32 reductions."""
    seed: int = 0
    """``dtrain.wrap`` seeds torch (CPU and CUDA), python's ``random`` and numpy's global RNG on
    each rank from a stable hash of (seed, rank) (``dtrain.engine.derived_seed``): dropout and any
    random draw after ``wrap`` are reproducible and differ between ranks. It does not touch the
    model's initial parameters (built before ``wrap``; every rank starts from rank 0's). A resumed
    run (checkpoint or snapshot) continues from the restored RNG states instead."""
    micro_batch_size: int | None = None
    """Per-rank micro-batch size; the default batch size of ``dtrain.data.loader``. None = the script decides."""
    loss_norm: Literal["batch", "tokens"] = "batch"
    """"batch": each micro-batch's loss counts the same (the mean of the micro-batch means).
    "tokens": the sum of per-token losses over the global batch divided by its number of valid
    tokens (labels != -100, or loss_mask), exact under uneven padding; rules in dtrain/loss.py."""

    def validate(self) -> None:
        _require(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "an integer >= 1")
        _require(self.micro_batch_size is None or self.micro_batch_size >= 1, "train.micro_batch_size",
                 self.micro_batch_size, "an integer >= 1, or omit it")
        _require(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            "train.clip_grad_norm", self.clip_grad_norm, "a positive float, or omit it to disable",
        )


@dataclass(kw_only=True)
class ZeroConfig:
    """ZeRO sharding (Rajbhandari et al.). Stage 0 means plain data parallelism (ddp)."""

    stage: int = 0
    bucket_mb: float = 16.0
    """Gradient bucket size for the overlapped reduction during backward (stages 0-2)."""
    prefetch: bool = True
    """Stage 3: all-gather the next unit's parameters while the current one computes."""
    unit_classes: list[str] = field(default_factory=list)
    """Stage 3: class names whose instances become gather units; empty = every ModuleList item."""
    sync_buffers: Literal["rank0", "mean", "none"] = "rank0"
    """Buffers (BatchNorm running stats) after each optimizer step: rank 0's on every rank (what DDP
    users expect), the mean of floating-point buffers, or each rank its own (checkpoints keep rank 0's)."""
    preset: str | None = None
    """Per-kind levels by name: "hsdp", "hpz", "frontier3", or "auto" (the planner); docs/hierarchical.md."""
    auto_tokens_per_step: int = 0
    """zero.preset = "auto": tokens one optimizer step trains over all ranks (global batch x sequence
    length), so the planner can weigh compute against communication; 0 = not known (it ranks by
    communication and the optimizer's step alone)."""
    params: str | None = None
    """Topology level the working parameters are split over ("rank" = unsplit, "node", "global", a
    declared level); with grads, optim and backward_params it overrides zero.stage and zero.preset."""
    grads: str | None = None
    optim: str | None = None
    backward_params: str | None = None
    """Level of the copy the backward all-gather reads (hpZ's secondary copy); default: params."""
    gather_dtype: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    """Wire type of parameter all-gathers (the master stays fp32); auto: bf16 under train.precision = bf16."""
    malloc_keep_mb: float = 1024.0
    """CPU runs: glibc keeps up to this many MiB of freed heap for reuse instead of returning it to the
    kernel at every free (dtrain/hostmem.py: ZeRO-3 regrows its gathered units each step); 0 = glibc's
    defaults. Not applied under the offload plugin, which sets its own (offload.malloc_mmap_mb)."""

    def validate(self) -> None:
        _require(self.stage in (0, 1, 2, 3), "zero.stage", self.stage, "0 (ddp), 1, 2 or 3")
        _require(self.bucket_mb > 0, "zero.bucket_mb", self.bucket_mb, "a positive number of MiB")
        _require(self.malloc_keep_mb >= 0, "zero.malloc_keep_mb", self.malloc_keep_mb, "a number of MiB >= 0")
        _require(isinstance(self.auto_tokens_per_step, int) and not isinstance(self.auto_tokens_per_step, bool)
                 and self.auto_tokens_per_step >= 0, "zero.auto_tokens_per_step", self.auto_tokens_per_step,
                 "an integer >= 0 (tokens per optimizer step over all ranks; 0 = unknown)")
        _require(self.preset in (None, "hsdp", "hpz", "frontier3", "auto"), "zero.preset", self.preset,
                 "one of hsdp, hpz, frontier3, auto (or omit it)")
        for kind in ("params", "grads", "optim", "backward_params"):
            value = getattr(self, kind)
            _require(value is None or (isinstance(value, str) and value.isidentifier()), f"zero.{kind}", value,
                     "a topology level name: rank, node, global or one declared in topology.levels")


@dataclass(kw_only=True)
class CommConfig:
    timeout_s: float = 300.0
    """A collective that does not complete in this time raises CollectiveTimeout."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def validate(self) -> None:
        _require(self.timeout_s > 0, "comm.timeout_s", self.timeout_s, "a positive number of seconds")


@dataclass(kw_only=True)
class TopologyConfig:
    """The cluster shape; see docs/topology.md."""

    nodes: int | None = None
    """Number of (simulated) nodes; None = take it from the launcher (DTRAIN_NODES) or 1."""
    levels: dict[str, int] = field(default_factory=dict)
    """Declared levels, name -> ranks per block, e.g. ``{pair = 2}``: a divisor of the node size, or a
    multiple of it dividing the world size (checked against the world in :mod:`dtrain.topology`)."""

    def validate(self) -> None:
        _require(self.nodes is None or self.nodes >= 1, "topology.nodes", self.nodes, "an integer >= 1")
        for name, size in self.levels.items():
            key = f"topology.levels.{name}"
            _require(name.isidentifier(), key, size, "a level name that is an identifier (e.g. pair)")
            _require(name not in ("rank", "node", "global"), key, size,
                     "a name other than the built-in levels rank, node and global")
            _require(size >= 1, key, size, "a number of ranks per block >= 1")


@dataclass(kw_only=True)
class MetricsConfig:
    path: str | None = None
    """JSONL file rank 0 writes one line per step to (contract: docs/metrics.md)."""
    progress: bool = False
    """Draw a progress bar on rank 0 (the launcher turns it on)."""
    tensorboard: str | None = None
    """Directory rank 0 also writes the per-step scalars to for TensorBoard (``pip install
    'dtrain[tensorboard]'``); None = off."""

    def validate(self) -> None:
        _require(self.tensorboard is None or bool(self.tensorboard.strip()), "metrics.tensorboard",
                 self.tensorboard, "a directory path, or omit it to write no TensorBoard events")


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str | None = None
    every: int = 0
    """Save to ``dir`` every this many steps; 0 disables periodic checkpoints."""
    strict: bool = False
    """Refuse (``CheckpointError``) to load a checkpoint saved with other optimizer
    hyperparameters or another optimizer class; by default the run follows its own optimizer
    factory and says what differs in one line (docs/layouts.md)."""

    def validate(self) -> None:
        _require(self.every >= 0, "checkpoint.every", self.every, "an integer >= 0")
        _require(
            self.every == 0 or self.dir is not None, "checkpoint.dir", self.dir,
            "a directory path when checkpoint.every > 0",
        )


BUILTIN_SECTION_MODULES = ("dtrain.plugins.co2_config", "dtrain.plugins.snapshot_config", "dtrain.seqpar.config",
                           "dtrain.offload.config", "dtrain.plugins.zo2_config")
"""Torch-free modules that register the built-in plugins' sections when first needed."""

_SECTIONS: dict[str, type] = {}  # plugin-owned sections, in registration order
_NEAR_MISS_CUTOFF = 0.8  # difflib ratio: 'zer' -> 'zero' (0.86), 'co3' -> 'co2' (0.67) is a plugin name


def register_section(name: str, section: type) -> None:
    """Make ``name`` a config section whose keys are the fields of the dataclass ``section``.

    Called by ``dtrain.plugins.register`` for a plugin's nested ``Config``. Registering the same
    class (or a re-definition of it, e.g. a script imported twice) again is a no-op; another
    class under a name already taken, or a core section's name, is an error.
    """
    if not name.isidentifier():
        raise ConfigError(f"config section name {name!r} must be an identifier (e.g. my_plugin)")
    if name in _core_sections():
        raise ConfigError(f"config section {name!r} is a core section of dtrain; give the plugin another name")
    if not (isinstance(section, type) and dataclasses.is_dataclass(section)):
        raise ConfigError(f"config section {name!r}: {section!r} is not a dataclass; declare the plugin's "
                          f"Config with @dataclass")
    existing = _SECTIONS.get(name)
    if existing is not None and existing is not section and existing.__qualname__ != section.__qualname__:
        raise ConfigError(f"config section {name!r} is registered twice ({existing.__module__}."
                          f"{existing.__qualname__} and {section.__module__}.{section.__qualname__})")
    _SECTIONS[name] = section


def registered_sections() -> dict[str, type]:
    """Every plugin-owned section by name (the built-in plugins' included)."""
    for module in BUILTIN_SECTION_MODULES:
        importlib.import_module(module)  # registers on first import; cached afterwards
    return dict(_SECTIONS)


def _core_sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


@dataclass(kw_only=True)
class Config:
    """The whole run configuration. Plugin sections are switched on by their own keys.

    Core sections are dataclass fields; a plugin's section is an attribute too
    (``config.co2.enabled``), made from its defaults the first time it is read. Sections nobody
    registered yet that :meth:`load` was told to defer stay raw until a plugin registers them
    (then the first read builds and validates them) or a strict load sees them.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        self._deferred: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not set: plugin sections not read yet.
        if name.startswith("_"):
            raise AttributeError(name)
        section = registered_sections().get(name)
        if section is None:
            raise AttributeError(f"config has no section {name!r}; sections: "
                                 f"{', '.join(self.section_names())}")
        value = _build(section, self.__dict__.get("_deferred", {}).pop(name, {}), f"{name}.")
        if hasattr(value, "validate"):
            value.validate()
        self.__dict__[name] = value
        return value

    def section_names(self) -> list[str]:
        """Core sections, then every registered plugin section."""
        return [*_core_sections(), *registered_sections()]

    @property
    def deferred_sections(self) -> dict[str, Any]:
        """Raw sections kept by ``load(..., defer_unknown_sections=True)`` that no plugin registered yet."""
        return {k: v for k, v in self._deferred.items() if k not in registered_sections()}

    def validate(self) -> "Config":
        for name in self.section_names():
            section = getattr(self, name)
            if hasattr(section, "validate"):
                section.validate()
        self._validate_combinations()
        return self

    def _validate_combinations(self) -> None:
        """Cross-section rules: pairs of settings that cannot run together."""
        levels = {k: getattr(self.zero, k) for k in ("params", "grads", "optim", "backward_params") if getattr(self.zero, k)}
        if self.co2.enabled and (self.zero.preset not in (None, "hsdp") or "global" in levels.values()):
            raise ConfigError("co2.enabled = true needs every zero level inside a node (co2's outer sync runs across "
                              "nodes): use zero.preset = 'hsdp' or zero.params/grads/optim = 'node' or smaller, "
                              "not 'global'")
        if self.co2.enabled and self.zero.stage == 3 and not levels and not self.zero.preset:
            raise ConfigError("co2.enabled = true cannot be combined with zero.stage = 3: CO2 keeps local "
                              "parameters per node, ZeRO-3 shards them; use zero.stage = 0, 1 or 2 with co2, "
                              "or set co2.enabled = false")
        zo2 = getattr(self, "zo2", None)
        if self.co2.enabled and getattr(zo2, "enabled", False):
            raise ConfigError("co2.enabled = true cannot be combined with zo2.enabled = true: both occupy the "
                              "step slot (first-order local steps vs zeroth-order steps); enable only one")

    def to_dict(self) -> dict[str, Any]:
        """Every section as plain data (deferred raw sections included, as given)."""
        data = {name: dataclasses.asdict(getattr(self, name)) for name in self.section_names()}
        data.update(self.deferred_sections)
        return data

    @classmethod
    def load(cls, source: "Config | Mapping[str, Any] | str | os.PathLike | None" = None,
             overrides: list[str] | None = None, *, defer_unknown_sections: bool = False) -> "Config":
        """Build a validated Config from a Config, dict, or .toml/.json path, then apply overrides.

        An unknown top-level key is an error naming it, unless ``defer_unknown_sections``: then a
        table nobody registered is kept raw (a plugin defined in the user's script registers it
        later, in the rank) -- except a near-miss of a known section's name ("did you mean"),
        which is an error at once. Unknown keys inside a known section are always errors.
        """
        if isinstance(source, Config):
            data = source.to_dict()
        elif source is None:
            data = {}
        elif isinstance(source, Mapping):
            data = dict(source)
        else:
            data = _read_file(Path(source))
        for item in overrides or []:
            _apply_override(data, item)
        return _build_config(cls, data, defer_unknown_sections).validate()

    @classmethod
    def from_deepspeed(cls, source: "Mapping[str, Any] | str | os.PathLike", *, world_size: int | None = None,
                       overrides: list[str] | None = None) -> "Config":
        """A validated Config from a DeepSpeed JSON config (a path or a dict), then ``overrides``.

        Keys dtrain cannot honour are a :class:`ConfigError` (one line per key, naming what to use
        instead); ``world_size`` checks ``train_batch_size`` now. Mapping: docs/deepspeed.md.
        """
        from dtrain.deepspeed_config import from_deepspeed

        return cls.load(from_deepspeed(source, world_size=world_size), overrides)


def _build_config(cls: type[Config], data: Any, defer: bool) -> Config:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config must be a table/section, got {type(data).__name__}")
    core, plugins = _core_sections(), registered_sections()
    known = [*core, *plugins]
    deferred: dict[str, Any] = {}
    for key in data:
        if key in known:
            continue
        near = difflib.get_close_matches(key, known, n=1, cutoff=_NEAR_MISS_CUTOFF)
        hint = f"did you mean '{near[0]}'? " if near else ""
        if defer and not near and isinstance(data[key], Mapping):
            deferred[key] = data[key]
            continue
        if defer and not near:
            raise ConfigError(f"unknown key '{key}' in config: a plugin's section must be a table, got "
                              f"{data[key]!r}")
        raise ConfigError(f"unknown {'section' if defer else 'key'} '{key}' in config; {hint}allowed keys: "
                          f"{', '.join(known)} (a plugin's section exists once the plugin is registered)")
    hints = typing.get_type_hints(cls)
    config = cls(**{name: _coerce(hints[name], data[name], name) for name in core if name in data})
    config._deferred = deferred
    for name in plugins:
        if name in data:
            config.__dict__[name] = _build(plugins[name], data[name], f"{name}.")
    return config


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise the standard ConfigError ``key = value is not allowed; expected allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed; expected {allowed}")


_require = require


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix[1:]}: {exc}") from exc
    raise ConfigError(f"config file {str(path)!r}: use a .toml or .json file")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"zero.stage=3"`` -> (["zero", "stage"], 3). Values are parsed as TOML, else kept as text."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. zero.stage=3)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [part.strip() for part in key.split(".")], value


def _apply_override(data: dict[str, Any], item: str) -> None:
    path, value = parse_override(item)
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table/section, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}' in {where}; allowed keys: {', '.join(sorted(fields))}"
        )
    for name, value in data.items():  # a value of a form the key no longer takes: say what to write
        for old, new in fields[name].metadata.get("replaced", ()):
            if type(value) is type(old) and value == old:
                raise ConfigError(f"{prefix}{name} = {_toml(value)} is no longer accepted; write "
                                  f"{prefix}{name} = {new} instead")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    return f"a {getattr(hint, '__name__', hint)}"


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        alternatives = [a for a in args if a is not type(None)]
        for arg in alternatives:
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(alternatives) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{key} = {value!r} is not allowed; expected "
                          f"{' or '.join(_describe(a) for a in alternatives)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table of {args[0].__name__} -> {args[1].__name__}, got {value!r}")
        for k in value:
            if not isinstance(k, args[0]):
                raise ConfigError(f"{key}: key {k!r} must be {args[0].__name__}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported config type {hint!r}")  # a bug in a section definition
