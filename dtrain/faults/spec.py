"""Fault specs: ``kind:key=value,...`` strings parsed, validated and (for chaos) expanded.

Kinds (``step`` is the training step after which the fault fires; it fires once per run):

* ``kill:rank=R,step=S`` -- SIGKILL rank R;
* ``node-loss:node=N,step=S`` -- every rank of node N, its snapshot process and its shared memory vanish;
* ``slow:rank=R,ms=M[,step=S]`` -- rank R sleeps M ms in every step from S (default 0) on;
* ``hang:rank=R,step=S`` -- rank R stops taking part in collectives: its peers time out, the
  group restarts;
* ``corrupt:rank=R,step=S`` -- flip bytes in rank R's committed snapshot shard of step S, then kill
  rank R, so the restore must detect the damage by checksum and rebuild the shard;
* ``net:bw=RATE`` -- limit the links between nodes (the launcher's ``--net``; needs namespaces);
* ``chaos:faults=F,seed=X`` -- F faults drawn from the kinds above, at distinct steps.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

__all__ = ["Fault", "FaultSpecError", "parse", "parse_all", "expand_chaos", "KINDS", "SYNTAX"]

KINDS: dict[str, tuple[set[str], set[str]]] = {  # kind -> (required keys, optional keys)
    "kill": ({"rank", "step"}, set()),
    "node-loss": ({"node", "step"}, set()),
    "slow": ({"rank", "ms"}, {"step"}),
    "hang": ({"rank", "step"}, set()),
    "corrupt": ({"rank", "step"}, set()),
    "net": ({"bw"}, {"latency", "burst"}),
    "chaos": ({"faults", "seed"}, {"kinds"}),
}
SYNTAX: dict[str, str] = {  # kind -> its spec with placeholders (``dtrain launch --help``)
    "kill": "kill:rank=R,step=S",
    "node-loss": "node-loss:node=N,step=S",
    "slow": "slow:rank=R,ms=M[,step=S]",
    "hang": "hang:rank=R,step=S",
    "corrupt": "corrupt:rank=R,step=S",
    "net": "net:bw=RATE[,latency=T][,burst=B]",
    "chaos": "chaos:faults=F,seed=X[,kinds=K1+K2]",
}
_INT_KEYS = {"rank", "step", "node", "ms", "faults", "seed"}
_SPEC = re.compile(r"^\s*([a-z][a-z-]*)\s*(?::(.*))?$")


class FaultSpecError(ValueError):
    """A malformed ``--inject`` spec; the message says what is wrong and the accepted form."""


@dataclass(frozen=True)
class Fault:
    kind: str
    params: dict[str, object] = field(default_factory=dict)
    index: int = 0
    """Position in the run's fault list: names the fault's fired-marker."""

    def get(self, key: str, default: int = 0) -> int:
        return int(self.params.get(key, default))  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"{self.kind}:" + ",".join(f"{k}={v}" for k, v in self.params.items())


def _usage(kind: str) -> str:
    required, optional = KINDS[kind]
    keys = [f"{k}=..." for k in sorted(required)] + [f"[{k}=...]" for k in sorted(optional)]
    return f"{kind}:" + ",".join(keys)


def parse(text: str, index: int = 0) -> Fault:
    match = _SPEC.match(text)
    kind = match.group(1) if match else ""
    if kind not in KINDS:
        raise FaultSpecError(f"--inject {text!r}: unknown fault kind {kind!r}; use one of {', '.join(KINDS)}")
    params: dict[str, object] = {}
    for item in filter(None, (match.group(2) or "").split(",")):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise FaultSpecError(f"--inject {text!r}: {item!r} is not key=value; expected {_usage(kind)}")
        if key in _INT_KEYS:
            try:
                params[key] = int(value)
            except ValueError:
                raise FaultSpecError(f"--inject {text!r}: {key} must be an integer, got {value!r}") from None
            if params[key] < 0:  # type: ignore[operator]
                raise FaultSpecError(f"--inject {text!r}: {key} must be >= 0, got {value}")
        else:
            params[key] = value
    required, optional = KINDS[kind]
    missing, unknown = required - params.keys(), params.keys() - required - optional
    if missing or unknown:
        what = f"missing {', '.join(sorted(missing))}" if missing else f"unknown key {', '.join(sorted(unknown))}"
        raise FaultSpecError(f"--inject {text!r}: {what}; expected {_usage(kind)}")
    return Fault(kind, params, index)


def parse_all(texts: list[str]) -> list[Fault]:
    return [parse(t, i) for i, t in enumerate(texts)]


def check_fits(faults: list[Fault], world: int, nodes: int, total_steps: int | None) -> None:
    """Ranks, nodes and steps must exist in this run."""
    for f in faults:
        if "rank" in f.params and f.get("rank") >= world:
            raise FaultSpecError(f"--inject {f.describe()}: rank {f.get('rank')} does not exist (world size {world})")
        if "node" in f.params and f.get("node") >= nodes:
            raise FaultSpecError(f"--inject {f.describe()}: node {f.get('node')} does not exist ({nodes} nodes)")
        if total_steps is not None and "step" in f.params and f.get("step") >= total_steps:
            raise FaultSpecError(f"--inject {f.describe()}: step {f.get('step')} is not before the last step "
                                 f"({total_steps}); it would never fire")


def expand_chaos(fault: Fault, world: int, nodes: int, total_steps: int, snapshots: bool,
                 first_index: int) -> list[Fault]:
    """The chaos fault's F concrete faults, the same on every rank and every attempt (seeded)."""
    rng = random.Random(fault.get("seed"))
    kinds = str(fault.params.get("kinds", "")).split("+") if fault.params.get("kinds") else \
        ["kill", "hang"] + (["corrupt"] if snapshots else []) + (["node-loss"] if nodes > 1 else [])
    count = fault.get("faults")
    candidates = list(range(2, max(3, total_steps - 1), 2))  # two steps apart: one fault per restart
    if count > len(candidates):
        raise FaultSpecError(f"--inject {fault.describe()}: {count} faults do not fit in {total_steps} steps")
    steps = sorted(rng.sample(candidates, count))
    out = []
    for i, step in enumerate(steps):
        kind = rng.choice(kinds)
        params: dict[str, object] = {"node": rng.randrange(nodes)} if kind == "node-loss" else \
            {"rank": rng.randrange(world)}
        params["step"] = step
        out.append(Fault(kind, params, first_index + i))
    return out
