"""Cluster description for the planner: TOML schema, loading/saving, validation, bandwidth v(d).

The schema is documented in ``cluster/README-planner.md``; every field has a default equal to
the shipped ``cluster/a100_8x8.toml`` so a partial file is valid. Units: memory in GiB,
bandwidth in GB/s (1e9 bytes/s) of data *leaving one device* during an all-to-all, latency
in microseconds, throughput in TFLOP/s (1e12 FLOP/s).

All-to-all bandwidth of a group of ``d`` devices (``G`` devices per node, groups placed on
contiguous aligned ranks so a group of ``d <= G`` stays inside one node):

* ``d <= G``: ``v(d) = intra_node_GBps`` (or the measured ``alltoall_GBps[d]`` if given);
* ``d > G``: of the ``d-1`` peers, ``G-1`` are reached over NVLink and ``d-G`` over the
  network, both links run concurrently, so the per-device time for ``B`` bytes is
  ``max(B (G-1)/(d-1) / v_intra, B (d-G)/(d-1) / v_inter)`` and ``v(d) = B / time``.
  This is the bandwidth drop when a group crosses nodes.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dtrain.planner.errors import PlannerError

GIB = 1024**3
REPO_CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster"

_SECTIONS: dict[str, tuple[str, ...]] = {
    "topology": ("num_devices", "devices_per_node"),
    "device": (
        "memory_GiB",
        "reserve_GiB",
        "linear_TFLOPS",
        "attention_TFLOPS",
        "overhead_us_per_layer",
    ),
    "network": (
        "intra_node_GBps",
        "inter_node_GBps",
        "intra_node_latency_us",
        "inter_node_latency_us",
        "bytes_per_element",
        "alltoall_GBps",
    ),
    "training": (
        "state_bytes_per_param",
        "activation_bytes_per_token_layer_hidden",
        "logit_bytes_per_token_vocab",
    ),
}


@dataclass(frozen=True)
class ClusterSpec:
    """A homogeneous cluster (defaults: 64 A100-80GB in 8 nodes, see cluster/a100_8x8.toml)."""

    name: str = "a100_8x8"
    description: str = ""
    # [topology]
    num_devices: int = 64
    devices_per_node: int = 8
    # [device]
    memory_GiB: float = 80.0
    reserve_GiB: float = 6.0
    linear_TFLOPS: float = 185.0
    attention_TFLOPS: float = 160.0
    overhead_us_per_layer: float = 30.0
    # [network]
    intra_node_GBps: float = 120.0
    inter_node_GBps: float = 2.5
    intra_node_latency_us: float = 10.0
    inter_node_latency_us: float = 25.0
    bytes_per_element: int = 2
    alltoall_GBps: dict[int, float] = field(default_factory=dict)
    # [training]
    state_bytes_per_param: float = 16.0
    activation_bytes_per_token_layer_hidden: float = 16.0
    logit_bytes_per_token_vocab: float = 6.0
    # [calibration] (informational, written by `dtrain plan calibrate`)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`PlannerError` if the description is inconsistent."""
        n, g = self.num_devices, self.devices_per_node
        if n <= 0 or g <= 0:
            raise PlannerError(
                f"cluster {self.name!r}: num_devices={n} and devices_per_node={g} must be positive"
            )
        if g & (g - 1):
            raise PlannerError(
                f"cluster {self.name!r}: devices_per_node={g} is not a power of two; SP groups "
                "are power-of-two sized and aligned, so use 1, 2, 4, 8, ... devices per node"
            )
        if n % g:
            raise PlannerError(
                f"cluster {self.name!r}: {n} devices is not a whole number of nodes of {g} "
                f"(gpus % gpus_per_node = {n % g}); use a multiple of {g}, e.g. {n - n % g or g}"
            )
        positive = (
            "memory_GiB",
            "linear_TFLOPS",
            "attention_TFLOPS",
            "intra_node_GBps",
            "inter_node_GBps",
            "bytes_per_element",
            "activation_bytes_per_token_layer_hidden",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise PlannerError(f"cluster {self.name!r}: {name} must be > 0")
        for name in ("reserve_GiB", "overhead_us_per_layer", "intra_node_latency_us",
                     "inter_node_latency_us", "state_bytes_per_param",
                     "logit_bytes_per_token_vocab"):
            if getattr(self, name) < 0:
                raise PlannerError(f"cluster {self.name!r}: {name} must be >= 0")
        if self.reserve_GiB >= self.memory_GiB:
            raise PlannerError(
                f"cluster {self.name!r}: reserve_GiB={self.reserve_GiB} leaves no memory of "
                f"memory_GiB={self.memory_GiB}"
            )
        for d, bw in self.alltoall_GBps.items():
            if d < 2 or d & (d - 1) or bw <= 0:
                raise PlannerError(
                    f"cluster {self.name!r}: alltoall_GBps entry {d} = {bw} needs a power-of-two "
                    "group size >= 2 and a positive bandwidth"
                )

    @property
    def num_nodes(self) -> int:
        return self.num_devices // self.devices_per_node

    def with_topology(self, num_devices: int | None, devices_per_node: int | None) -> "ClusterSpec":
        """Copy with another device count / node size (validated)."""
        return replace(
            self,
            num_devices=self.num_devices if num_devices is None else num_devices,
            devices_per_node=self.devices_per_node if devices_per_node is None else devices_per_node,
        )

    # ------------------------------------------------------------------ network
    def crosses_nodes(self, d: int) -> bool:
        """Whether an aligned group of ``d`` devices spans more than one node."""
        return d > self.devices_per_node

    def alltoall_bandwidth(self, d: int) -> float:
        """``v(d)``: per-device all-to-all bandwidth in bytes/s of a group of ``d`` devices."""
        if d < 2:
            return float("inf")
        if d in self.alltoall_GBps:
            return self.alltoall_GBps[d] * 1e9
        g = self.devices_per_node
        intra, inter = self.intra_node_GBps * 1e9, self.inter_node_GBps * 1e9
        if d <= g:
            return intra
        seconds_per_byte = max((g - 1) / (d - 1) / intra, (d - g) / (d - 1) / inter)
        return 1.0 / seconds_per_byte

    def alltoall_latency(self, d: int) -> float:
        """Fixed cost in seconds of one all-to-all in a group of ``d`` devices."""
        if d < 2:
            return 0.0
        lat = self.inter_node_latency_us if self.crosses_nodes(d) else self.intra_node_latency_us
        return lat * 1e-6

    # ------------------------------------------------------------------ TOML io
    def to_toml(self) -> str:
        """Serialise to the documented TOML schema (round-trips through :func:`load_cluster`)."""
        lines = [f"name = {_toml_value(self.name)}"]
        if self.description:
            lines.append(f"description = {_toml_value(self.description)}")
        for section, keys in _SECTIONS.items():
            lines.append(f"\n[{section}]")
            for key in keys:
                if key == "alltoall_GBps":
                    continue
                lines.append(f"{key} = {_toml_value(getattr(self, key))}")
        if self.alltoall_GBps:
            lines.append("\n[network.alltoall_GBps]")
            for d in sorted(self.alltoall_GBps):
                lines.append(f'"{d}" = {_toml_value(self.alltoall_GBps[d])}')
        if self.calibration:
            lines.append("\n[calibration]")
            for key in sorted(self.calibration):
                lines.append(f"{key} = {_toml_value(self.calibration[key])}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite {value} to a cluster file")
        return repr(float(f"{value:.7g}"))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def cluster_from_dict(data: dict[str, Any], source: str = "<dict>") -> ClusterSpec:
    """Build a :class:`ClusterSpec` from parsed TOML, rejecting unknown sections and keys."""
    kwargs: dict[str, Any] = {}
    known_top = {"name", "description", "calibration", *_SECTIONS}
    for key in data:
        if key not in known_top:
            raise PlannerError(
                f"{source}: unknown key or section {key!r}; expected one of {sorted(known_top)} "
                "(see cluster/README-planner.md)"
            )
    for key in ("name", "description"):
        if key in data:
            kwargs[key] = str(data[key])
    types = {f.name: f.type for f in fields(ClusterSpec)}
    for section, keys in _SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise PlannerError(f"{source}: [{section}] must be a table")
        for key, value in table.items():
            if key not in keys:
                raise PlannerError(
                    f"{source}: unknown key {key!r} in [{section}]; expected one of {list(keys)}"
                )
            if key == "alltoall_GBps":
                try:
                    kwargs[key] = {int(d): float(bw) for d, bw in value.items()}
                except (AttributeError, ValueError, TypeError):
                    raise PlannerError(
                        f"{source}: [network.alltoall_GBps] must map group sizes to GB/s, "
                        'e.g. "2" = 5.0'
                    ) from None
                continue
            want_int = types[key] in ("int", int)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PlannerError(f"{source}: [{section}] {key} = {value!r} must be a number")
            if want_int and value != int(value):
                raise PlannerError(f"{source}: [{section}] {key} = {value!r} must be an integer")
            kwargs[key] = int(value) if want_int else float(value)
    if "calibration" in data:
        kwargs["calibration"] = dict(data["calibration"])
    return ClusterSpec(**kwargs)


def load_cluster(path: str | Path) -> ClusterSpec:
    """Load and validate a cluster TOML file (schema: cluster/README-planner.md)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise PlannerError(
            f"cluster file {str(p)!r} does not exist; pass --cluster with a TOML file such as "
            "cluster/a100_8x8.toml, or run `dtrain plan calibrate` to create one"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise PlannerError(f"cluster file {str(p)!r} is not valid TOML: {exc}") from None
    return cluster_from_dict(data, source=str(p))


def default_cluster() -> ClusterSpec:
    """``cluster/a100_8x8.toml`` when the repository is present, else identical built-in defaults."""
    path = REPO_CLUSTER_DIR / "a100_8x8.toml"
    return load_cluster(path) if path.is_file() else ClusterSpec()
