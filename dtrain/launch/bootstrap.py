"""The rank-side entry of both launchers: run the user's script as ``__main__`` and report how it
failed.

Every rank that ``dtrain launch`` starts runs :func:`run_script` (forked from the fork server,
``python -m dtrain.launch.bootstrap script.py args...`` otherwise, and on Ray). When the script
fails it writes one *rank event* line to stderr: :data:`RANK_EVENT_PREFIX` and a JSON object
``{"failed_at": unix time, "status": exit status, "line": text or null}``. The launcher's log
followers take these lines out of the rank's output (dtrain/launch/local.py, ``RankLogFollowers``)
and use them to

* name the rank that failed first by the time it failed, not by when the launcher noticed (a
  peer that only saw the knock-on gloo error fails later);
* report a :func:`dtrain.errors.is_usage_error` (``dtrain.UsageError``, ``dtrain.ConfigError``),
  or a ``dtrain.checkpoint.CheckpointError`` (a missing or damaged checkpoint: a restart would
  meet the same files), once per job: such a rank prints no traceback (unless ``DTRAIN_DEBUG=1``), exits with
  :data:`dtrain.errors.USAGE_EXIT_STATUS` and its ``line`` is the launcher's whole report; the
  group is not restarted.

Torch-free: the spawned interpreter imports only this, ``dtrain.errors`` and ``dtrain.config``
before the script.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import time
import traceback
from typing import Any

from dtrain.errors import USAGE_EXIT_STATUS, is_usage_error, usage_line

__all__ = ["run_script", "parse_rank_event", "RANK_EVENT_PREFIX", "MODULE"]

ACTIVE = False
"""True in a rank that :func:`run_script` runs: its input errors are reported here, as one line."""
RANK_EVENT_PREFIX = "@dtrain-rank-event "
"""Starts a rank-event line."""
MODULE = "dtrain.launch.bootstrap"
"""``python -m MODULE script.py args...`` runs a rank in a fresh interpreter."""


def _debug() -> bool:
    return os.environ.get("DTRAIN_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _report(failed_at: float, status: int, line: str | None = None) -> None:
    event = {"failed_at": failed_at, "status": status, "line": line}
    sys.stderr.write(RANK_EVENT_PREFIX + json.dumps(event) + "\n")
    sys.stderr.flush()


def _status(code: Any) -> int:
    """The exit status ``SystemExit(code)`` ends the interpreter with."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def parse_rank_event(line: str) -> dict[str, Any] | None:
    """The event a rank-event line carries, or None for any other line. The prefix may follow other
    text on the line: a progress bar the rank was drawing when it failed ends without a newline."""
    start = line.find(RANK_EVENT_PREFIX)
    if start < 0:
        return None
    try:
        event = json.loads(line[start + len(RANK_EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _input_error_line(exc: BaseException) -> str | None:
    """The one line of an error only the user can fix (usage, config, a bad checkpoint), or None."""
    if is_usage_error(exc):
        return usage_line(exc)
    checkpoint = sys.modules.get("dtrain.checkpoint")
    if checkpoint is not None and isinstance(exc, getattr(checkpoint, "CheckpointError", ())):
        return f"dtrain: checkpoint error: {' '.join(str(exc).split())}"
    return None


def run_script(script: str, *args: str) -> None:
    """Run ``script`` as ``__main__`` with ``args``, as ``python script args...`` would; a failure
    ends in ``SystemExit`` with its status after the rank event is written."""
    global ACTIVE
    ACTIVE = True
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:
        if _status(exc.code):
            _report(time.time(), _status(exc.code))
        raise
    except BaseException as exc:
        failed_at = time.time()
        line = _input_error_line(exc)
        if line is not None:
            if _debug():
                traceback.print_exc()
            _report(failed_at, USAGE_EXIT_STATUS, line)
            raise SystemExit(USAGE_EXIT_STATUS) from None
        traceback.print_exc()
        _report(failed_at, 1)
        raise SystemExit(1) from None


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(f"usage: python -m {MODULE} script.py [args...]")
    run_script(argv[0], *argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
