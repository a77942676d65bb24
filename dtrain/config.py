"""The typed configuration tree: loading from dict / TOML / JSON, `a.b=v` overrides, validation.

Every section is a kw_only dataclass. Loading walks the dataclass fields, so an unknown key, a
value of the wrong type or an impossible value is a :class:`ConfigError` that names the full key
(``zero.stage``) and says what is allowed. Cross-section rules (incompatible plugins) live in
:meth:`Config.validate`, which runs after every load.
"""
from __future__ import annotations

import dataclasses
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

    def validate(self) -> None:
        _require(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "an integer >= 1")
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

    def validate(self) -> None:
        _require(self.stage in (0, 1, 2, 3), "zero.stage", self.stage, "0 (ddp), 1, 2 or 3")
        _require(self.bucket_mb > 0, "zero.bucket_mb", self.bucket_mb, "a positive number of MiB")


@dataclass(kw_only=True)
class CommConfig:
    timeout_s: float = 300.0
    """A collective that does not complete in this time raises CollectiveTimeout."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def validate(self) -> None:
        _require(self.timeout_s > 0, "comm.timeout_s", self.timeout_s, "a positive number of seconds")


@dataclass(kw_only=True)
class TopologyConfig:
    nodes: int | None = None
    """Number of (simulated) nodes; None = take it from the launcher (DTRAIN_NODES) or 1."""

    def validate(self) -> None:
        _require(self.nodes is None or self.nodes >= 1, "topology.nodes", self.nodes, "an integer >= 1")


@dataclass(kw_only=True)
class MetricsConfig:
    path: str | None = None
    """JSONL file rank 0 writes one line per step to (DESIGN.md metrics contract)."""
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

    def validate(self) -> None:
        _require(self.every >= 0, "checkpoint.every", self.every, "an integer >= 0")
        _require(
            self.every == 0 or self.dir is not None, "checkpoint.dir", self.dir,
            "a directory path when checkpoint.every > 0",
        )


@dataclass(kw_only=True)
class CO2Config:
    """CO2 (Sun et al., ICLR 2024): local steps + an outer all-reduce overlapped with the next round."""

    enabled: bool = False
    local_steps: int = 4
    """tau: inner (local) optimizer steps per round; the outer sync starts every tau steps."""
    outer_lr: float = 1.0
    """alpha: outer learning rate applied to the outer momentum."""
    outer_momentum: float = 0.5
    """beta: outer momentum decay (0 disables outer momentum)."""
    clip: float | None = None
    """phi: clip the outer momentum element-wise to [-phi, phi]; None disables clipping."""
    penalty: bool = True
    """Scale each pseudo-gradient by 1 / Lambda, the staleness gap penalty (see plugins/co2.py)."""
    intra_node_sync: bool = True
    """Ranks of one node all-reduce gradients every step; False makes every rank its own worker."""
    overlap: bool = True
    """False = synchronous local SGD: the outer all-reduce is waited for and applied at once."""

    def validate(self) -> None:
        if self.enabled and self.local_steps < 1:
            raise ConfigError(f"co2.local_steps = {self.local_steps!r} is not allowed with co2.enabled = true; "
                              f"expected an integer >= 1 (the number of local steps per round)")
        _require(self.local_steps >= 1, "co2.local_steps", self.local_steps, "an integer >= 1")
        _require(self.outer_lr > 0, "co2.outer_lr", self.outer_lr, "a positive float")
        _require(0 <= self.outer_momentum < 1, "co2.outer_momentum", self.outer_momentum, "a float in [0, 1)")
        _require(self.clip is None or self.clip > 0, "co2.clip", self.clip,
                 "a positive float, or omit it to disable outer-momentum clipping")


@dataclass(kw_only=True)
class SnapshotConfig:
    """In-memory snapshots held by one snapshot process per node, erasure coded across nodes."""

    enabled: bool = False
    every: int = 1
    """Snapshot every this many steps."""
    ec_data: int = 0
    """k: data nodes per coding group; 0 = every node of the job not used for parity."""
    ec_parity: int = 1
    """m: parity nodes per coding group (any m lost nodes of a group are rebuilt); capped at nodes - 1."""
    persist_every: int = 0
    """Write every this many steps' committed snapshot to ``persist_dir`` in the background; 0 = never."""
    persist_dir: str | None = None
    timeout_s: float = 60.0
    """How long a snapshot may wait for the previous one to commit before the rank gives up."""
    idle_s: float = 120.0
    """A snapshot process with no rank connected for this long exits (the job is gone)."""
    run_id: str | None = None
    """Names the job's snapshot processes; default: the launcher's run id."""
    host: str | None = None
    """Address the snapshot process listens on for its peers; default: this node's gloo address."""

    def validate(self) -> None:
        _require(self.every >= 1, "snapshot.every", self.every, "an integer >= 1")
        _require(self.ec_data >= 0, "snapshot.ec_data", self.ec_data, "an integer >= 0 (0 = automatic)")
        _require(self.ec_parity >= 0, "snapshot.ec_parity", self.ec_parity, "an integer >= 0")
        _require(self.persist_every >= 0, "snapshot.persist_every", self.persist_every, "an integer >= 0")
        _require(self.persist_every == 0 or self.persist_dir is not None, "snapshot.persist_dir",
                 self.persist_dir, "a directory path when snapshot.persist_every > 0")
        _require(self.timeout_s > 0, "snapshot.timeout_s", self.timeout_s, "a positive number of seconds")
        _require(self.idle_s > 0, "snapshot.idle_s", self.idle_s, "a positive number of seconds")


@dataclass(kw_only=True)
class Config:
    """The whole run configuration. Plugin sections are switched on by their own keys."""

    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    co2: CO2Config = field(default_factory=CO2Config)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        self._validate_combinations()
        return self

    def _validate_combinations(self) -> None:
        """Cross-section rules: pairs of settings that cannot run together."""
        if self.co2.enabled and self.zero.stage == 3:
            raise ConfigError("co2.enabled = true cannot be combined with zero.stage = 3: CO2 keeps local "
                              "parameters per node, ZeRO-3 shards them; use zero.stage = 0, 1 or 2 with co2, "
                              "or set co2.enabled = false")
        zo2 = getattr(self, "zo2", None)
        if self.co2.enabled and getattr(zo2, "enabled", False):
            raise ConfigError("co2.enabled = true cannot be combined with zo2.enabled = true: both occupy the "
                              "step slot (first-order local steps vs zeroth-order steps); enable only one")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, source: "Config | Mapping[str, Any] | str | os.PathLike | None" = None,
             overrides: list[str] | None = None) -> "Config":
        """Build a validated Config from a Config, dict, or .toml/.json path, then apply overrides."""
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
        return _build(cls, data, prefix="").validate()


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed; expected {allowed}")


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
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {list(args)}")
        return value
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
