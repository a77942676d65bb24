"""Launch-environment contract: parse what ``dtrain launch`` (or torchrun) put in os.environ.

This module owns the reading side of the contract between the launcher
(:mod:`dtrain.launch.local`) and the training engine. The launcher sets the
torchrun variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``TORCHELASTIC_RESTART_COUNT`` ...) plus these dtrain variables:

``DTRAIN_NODES``      number of (simulated) nodes M; node of rank r is r // N
``DTRAIN_NPROC``      ranks per node N
``DTRAIN_METRICS``    metrics output path (optional)
``DTRAIN_OVERRIDES``  JSON list of ``"a.b=v"`` config overrides
``DTRAIN_CONFIG``     config file path (optional)
``DTRAIN_PROGRESS``   ``"1"`` when rank 0 should draw a progress bar
``DTRAIN_TIMEOUT_S``  collective timeout in seconds, overrides ``comm.timeout_s`` (optional)
``DTRAIN_INJECT``     JSON list of fault-injection specs (optional)

On a restart (``TORCHELASTIC_RESTART_COUNT`` > 0) the launchers also set:

``DTRAIN_RESTART_CAUSE``  one line saying what failed, e.g. ``node 1 (10.0.0.2) lost`` or
                          ``rank 3 was killed by SIGKILL``
``DTRAIN_FAILURE_TIME``   unix time (float seconds) at which the launcher saw the failure

With nothing set (plain ``python script.py``) :func:`read_launch_env` returns a
world-size-1 environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["LaunchEnv", "read_launch_env", "process_defaults", "RESTART_CAUSE_VAR", "FAILURE_TIME_VAR"]

RESTART_CAUSE_VAR = "DTRAIN_RESTART_CAUSE"
FAILURE_TIME_VAR = "DTRAIN_FAILURE_TIME"


@dataclass(frozen=True)
class LaunchEnv:
    """The launch parameters one rank sees."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    nodes: int = 1
    nproc_per_node: int = 1
    metrics_path: str | None = None
    overrides: list[str] = field(default_factory=list)
    config_path: str | None = None
    progress: bool = False
    timeout_s: float | None = None
    inject: list[str] = field(default_factory=list)
    restart_count: int = 0
    max_restarts: int = 0
    restart_cause: str | None = None
    failure_time: float | None = None

    @property
    def node_rank(self) -> int:
        """Index of the (simulated) node this rank belongs to."""
        return self.rank // self.nproc_per_node

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _json_str_list(env: Mapping[str, str], name: str) -> list[str]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return []
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc.msg}): {raw!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a JSON list of strings, got {raw!r}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _optional_str(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return raw if raw else None


def _timeout(env: Mapping[str, str]) -> float | None:
    raw = env.get("DTRAIN_TIMEOUT_S")
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"DTRAIN_TIMEOUT_S={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"DTRAIN_TIMEOUT_S={value} must be > 0")
    return value


def _failure_time(env: Mapping[str, str]) -> float | None:
    raw = env.get(FAILURE_TIME_VAR)
    if raw is None or raw.strip() == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{FAILURE_TIME_VAR}={raw!r} is not a number") from None


def _topology(env: Mapping[str, str], world_size: int) -> tuple[int, int]:
    """Return (nodes, nproc_per_node), checking they multiply to the world size."""
    nodes_set = bool(env.get("DTRAIN_NODES", "").strip())
    nproc_set = bool(env.get("DTRAIN_NPROC", "").strip())
    if nodes_set and nproc_set:
        nodes = _int(env, "DTRAIN_NODES", 1, 1)
        nproc = _int(env, "DTRAIN_NPROC", 1, 1)
        if nodes * nproc != world_size:
            raise ValueError(
                f"WORLD_SIZE={world_size} does not match DTRAIN_NODES={nodes} x "
                f"DTRAIN_NPROC={nproc}={nodes * nproc}; launch with "
                f"`dtrain launch --nodes {nodes} --nproc {nproc}` or unset the DTRAIN_* variables"
            )
        return nodes, nproc
    if nodes_set or nproc_set:
        name = "DTRAIN_NODES" if nodes_set else "DTRAIN_NPROC"
        given = _int(env, name, 1, 1)
        if world_size % given:
            raise ValueError(f"WORLD_SIZE={world_size} is not divisible by {name}={given}")
        other = world_size // given
        return (given, other) if nodes_set else (other, given)
    # Plain torchrun (or plain python): one node per LOCAL_WORLD_SIZE ranks.
    local_world = _int(env, "LOCAL_WORLD_SIZE", world_size, 1)
    if world_size % local_world:
        raise ValueError(
            f"WORLD_SIZE={world_size} is not divisible by LOCAL_WORLD_SIZE={local_world}"
        )
    return world_size // local_world, local_world


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Parse the launch variables from ``environ`` (default: ``os.environ``).

    Raises ValueError with a readable message when the variables are inconsistent.
    """
    env = os.environ if environ is None else environ
    world_size = _int(env, "WORLD_SIZE", 1, 1)
    rank = _int(env, "RANK", 0, 0)
    if rank >= world_size:
        raise ValueError(f"RANK={rank} must be < WORLD_SIZE={world_size}")
    nodes, nproc = _topology(env, world_size)
    local_rank = _int(env, "LOCAL_RANK", rank % nproc, 0)
    return LaunchEnv(
        world_size=world_size,
        rank=rank,
        local_rank=local_rank,
        nodes=nodes,
        nproc_per_node=nproc,
        metrics_path=_optional_str(env, "DTRAIN_METRICS"),
        overrides=_json_str_list(env, "DTRAIN_OVERRIDES"),
        config_path=_optional_str(env, "DTRAIN_CONFIG"),
        progress=_flag(env, "DTRAIN_PROGRESS"),
        timeout_s=_timeout(env),
        inject=_json_str_list(env, "DTRAIN_INJECT"),
        restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0, 0),
        max_restarts=_int(env, "TORCHELASTIC_MAX_RESTARTS", 0, 0),
        restart_cause=_optional_str(env, RESTART_CAUSE_VAR),
        failure_time=_failure_time(env),
    )


def process_defaults(gloo_ifname: str | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Per-process defaults (one OMP thread, unbuffered output, gloo's interface), only where
    ``environ`` (default: the launcher's environment) has not chosen already."""
    environ = os.environ if environ is None else environ
    defaults = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if gloo_ifname:
        defaults["GLOO_SOCKET_IFNAME"] = gloo_ifname
    return {key: value for key, value in defaults.items() if key not in environ}
