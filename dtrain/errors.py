"""Errors the user fixes, not the cluster: :class:`UsageError` (and :class:`dtrain.ConfigError`).

A rank that raises one under ``dtrain launch`` prints one line instead of a traceback and exits
with :data:`USAGE_EXIT_STATUS`; the launcher prints the line once for the whole job and does not
restart the group, since a restart would fail the same way (dtrain/launch/bootstrap.py). Under
plain ``python`` the error is an ordinary exception. Torch-free.
"""
from __future__ import annotations

from dtrain.config import ConfigError

__all__ = ["UsageError", "ConfigError", "USAGE_EXIT_STATUS", "is_usage_error", "usage_line"]

USAGE_EXIT_STATUS = 2
"""Exit status of a rank (and of ``dtrain launch``) that failed on a usage or config error; also
what argparse exits with, so a script's own argument errors are not restarted either."""


class UsageError(ValueError):
    """Bad input that only the user can fix (arguments, sizes that do not fit the world size...).

    The message is the whole report: say what is wrong and how to fix it, in one line.
    """


def is_usage_error(exc: BaseException) -> bool:
    return isinstance(exc, (UsageError, ConfigError))


def usage_line(exc: BaseException) -> str:
    """``dtrain: config error: ...`` / ``dtrain: error: ...``: the one line a usage error prints."""
    kind = "config error" if isinstance(exc, ConfigError) else "error"
    return f"dtrain: {kind}: {' '.join(str(exc).split())}"
