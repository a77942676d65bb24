"""Planner error type: every user-facing failure of the planner is a ``PlannerError``.

The message always names what is wrong and how to fix it; the CLI prints it as
``error: <message>`` and exits with status 2 (no traceback).
"""
from __future__ import annotations


class PlannerError(ValueError):
    """Invalid planner input (batch, cluster, model shape) or an unplannable batch."""
