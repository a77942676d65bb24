"""Which snapshot to restore: the newest step every node can have back, in memory or on disk.

:func:`choose_in_memory` works on the daemons' status reports alone (pure, unit-tested): a node's
data for step ``s`` is *available* when its daemon holds it, or *rebuildable* when every stripe it
contributed to still has ``k`` blocks among the surviving daemons' data chunks and parity. A step
is restorable when that holds for every node; otherwise the disk tier (:func:`persisted_steps`,
restricted to the steps every rank listed: :func:`agreed_steps`) is next, then a disk checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dtrain.snapshot.coding import GroupLayout

__all__ = ["agreed_steps", "choose_in_memory", "persisted_steps"]


def _has_data(status: dict[str, Any] | None, step: int) -> bool:
    entry = (status or {}).get("steps", {}).get(str(step))
    return bool(entry and entry["local"])


def _has_parity(status: dict[str, Any] | None, step: int, stripe: int) -> bool:
    entry = (status or {}).get("steps", {}).get(str(step))
    return bool(entry and stripe in entry["parity"])


def rebuildable(statuses: list[dict[str, Any] | None], group: GroupLayout, node: int, step: int) -> bool:
    for stripe in group.data_stripes(node):
        blocks = sum(_has_data(statuses[n], step) for n in group.data_nodes(stripe) if n != node)
        blocks += sum(_has_parity(statuses[n], step, stripe) for n in group.parity_nodes(stripe))
        if blocks < group.k:
            return False
    return True


def choose_in_memory(statuses: list[dict[str, Any] | None], groups: list[GroupLayout]
                     ) -> tuple[int | None, list[int]]:
    """(newest restorable step, nodes whose data must be rebuilt from parity) or (None, [])."""
    steps = {int(s) for st in statuses if st for s in st.get("steps", {})}
    group_of = {n: g for g in groups for n in g.nodes}
    for step in sorted(steps, reverse=True):
        rebuild = [n for n in range(len(statuses)) if not _has_data(statuses[n], step)]
        if all(rebuildable(statuses, group_of[n], n, step) for n in rebuild):
            return step, rebuild
    return None, []


def persisted_steps(directory: str | Path, nodes: int) -> list[tuple[int, dict[int, dict[str, Any]]]]:
    """Complete persisted steps, newest first: (step, node -> index) with every node's index."""
    root = Path(directory)
    out = []
    for d in sorted(root.glob("step-*"), reverse=True):
        try:
            step = int(d.name.split("-", 1)[1])
            index = {n: json.loads((d / f"node{n}.json").read_text()) for n in range(nodes)}
        except (OSError, ValueError):
            continue  # incomplete (a node has not finished writing it) or not ours
        out.append((step, index))
    return out


def agreed_steps(listed_by_rank: list[list[int]]) -> set[int]:
    """The persisted steps every rank found complete. Ranks list the disk tier one by one, and a
    daemon that outlived the failure may finish writing a step between two listings; a rank that
    saw it would load a newer step than the others and the run would hang in its next collective.
    So the ranks restore only from steps all of them saw."""
    if not listed_by_rank:
        return set()
    return set.intersection(*(set(steps) for steps in listed_by_rank))
