"""Per-run state on a shared machine: private directories, owner records, and who may clear what.

Several jobs (and several users, root included) share one machine's ``/dev/shm``, ``/run`` and
``/tmp``. This module owns the rules every per-run resource of dtrain follows (network
namespaces in dtrain.netns, snapshot run directories in dtrain.snapshot.client, lock files):

* a shared directory is used only after ``lstat`` shows it is a real directory (no symlink) owned
  by this user and closed to group and others (:func:`private_dir`); a loose mode on our own
  directory is tightened, anything else is refused with one line;
* a resource is named per run and carries an *owner record* (:func:`write_owner`): the owner's PID
  and its start time, written with ``O_CREAT|O_EXCL|O_NOFOLLOW`` in mode 0600;
* a leftover is cleared only when :func:`owner_alive` says its owner is gone: the PID is dead, a
  zombie, or now belongs to another process (its start time differs);
* a PID read from a file is signalled only when :func:`same_process` confirms it is still the
  process that was recorded (dtrain.snapshot.client.stop_daemon).

Torch-free (the snapshot process imports it).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from dtrain.errors import UsageError

__all__ = ["UnsafePathError", "private_dir", "state_root", "write_owner", "read_record", "owner_record",
           "owner_alive", "start_time", "same_process", "open_new"]


class UnsafePathError(UsageError):
    """A shared directory or file is not what dtrain expects (owner, mode, a symlink)."""


def private_dir(path: Path | str, parents: bool = True) -> Path:
    """``path`` as a directory only this user can use: created 0700 if missing, else checked with
    ``lstat`` (a directory, not a symlink, owned by this user; group/other bits are removed from
    our own directory). Raises :class:`UnsafePathError` naming the problem otherwise."""
    path = Path(path)
    try:
        if parents and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafePathError(f"cannot create {path}: {exc.strerror}; make its parent writable or pick "
                              "another place (DTRAIN_SHM_DIR / DTRAIN_STATE_DIR)") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a directory'}; "
                              "dtrain keeps private state there: remove it and run again")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); "
                              "remove it or set DTRAIN_SHM_DIR / DTRAIN_STATE_DIR to a directory of yours")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700, follow_symlinks=False)
    return path


def state_root() -> Path:
    """The 0700 directory of this user's per-run records and lock files: ``DTRAIN_STATE_DIR``, else
    ``/run/dtrain-<uid>`` (root), ``$XDG_RUNTIME_DIR/dtrain``, or ``/tmp/dtrain-<uid>``."""
    explicit = os.environ.get("DTRAIN_STATE_DIR")
    if explicit:
        return private_dir(explicit)
    uid = os.geteuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if uid == 0 and os.access("/run", os.W_OK):
        return private_dir(f"/run/dtrain-{uid}", parents=False)
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return private_dir(Path(runtime) / "dtrain", parents=False)
    return private_dir(f"/tmp/dtrain-{uid}", parents=False)


def open_new(path: Path | str, mode: int = 0o600) -> int:
    """A new file at ``path`` for writing: ``O_CREAT|O_EXCL|O_NOFOLLOW``, so an existing file or a
    planted symlink is never followed or reused."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] in "ZX" else fields[19]


def owner_record(pid: int | None = None, **extra: Any) -> dict[str, Any]:
    """``{"pid", "start", **extra}`` of ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": start_time(pid), **extra}


def write_owner(path: Path | str, record: dict[str, Any] | None = None) -> None:
    """Write ``record`` (this process's :func:`owner_record` by default) to a new 0600 file."""
    fd = open_new(path)
    with os.fdopen(fd, "w") as fh:
        json.dump(record if record is not None else owner_record(), fh)


def read_record(path: Path | str) -> dict[str, Any] | None:
    """The JSON object in ``path`` (not followed if a symlink), or None if absent or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def same_process(pid: int, start: str | None) -> bool:
    """Whether ``pid`` runs and is the process that started at ``start`` (not a reused PID)."""
    now = start_time(pid)
    return now is not None and (start is None or now == start)


def owner_alive(record: dict[str, Any] | None) -> bool:
    """Whether the owner in ``record`` still runs; a record without a usable PID counts as alive
    (never clear what we cannot attribute)."""
    if not record or not isinstance(record.get("pid"), int):
        return True
    start = record.get("start")
    return same_process(record["pid"], start if isinstance(start, str) else None)
