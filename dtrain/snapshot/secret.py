"""The job secret: the one key that authenticates snapshot traffic between nodes (see SECURITY.md).

``dtrain launch`` (local and Ray) generates one secret per job and hands it to every rank in
:data:`SECRET_VAR`; the node's first rank passes it to its snapshot process over the node's
private Unix socket. It never travels over a collective. Without a launcher, in order:

* :data:`SECRET_VAR` (at least 32 hex digits), set by the user to the same value on every node;
* :data:`SECRET_FILE_VAR`: a file owned by this user and readable by nobody else (mode 0600);
* a ``job.secret`` file (0600) in the job's run directory, created by whichever node leader comes
  first. Nodes of one machine share it; nodes of different machines would each make their own,
  and the start-up check (:func:`key_check`, compared across nodes) stops such a job with a
  line that says to set :data:`SECRET_VAR`.

Torch-free (the launcher imports it).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

__all__ = ["SECRET_VAR", "SECRET_FILE_VAR", "SecretError", "new_secret", "job_secret", "key_check"]

SECRET_VAR = "DTRAIN_JOB_SECRET"
SECRET_FILE_VAR = "DTRAIN_JOB_SECRET_FILE"
_MIN_BYTES = 16
_HINT = (f"set {SECRET_VAR} to the same random value on every node, e.g. "
         f"export {SECRET_VAR}=$(python -c 'import secrets; print(secrets.token_hex(32))')")


class SecretError(ValueError):
    """No usable job secret; the message says what to set."""


def new_secret() -> str:
    """A fresh job secret (64 hex digits)."""
    return secrets.token_hex(32)


def job_secret(run_dir: Path) -> bytes:
    """This job's secret, from the environment, a secret file, or the run directory (module doc)."""
    text = os.environ.get(SECRET_VAR)
    if text is not None:
        try:
            key = bytes.fromhex(text.strip())
        except ValueError:
            raise SecretError(f"{SECRET_VAR} is not hexadecimal; {_HINT}") from None
        if len(key) < _MIN_BYTES:
            raise SecretError(f"{SECRET_VAR} has {len(key)} bytes, fewer than {_MIN_BYTES}; {_HINT}")
        return key
    path = os.environ.get(SECRET_FILE_VAR)
    if path:
        return _read_private(Path(path), SECRET_FILE_VAR)
    return _shared_file(run_dir / "job.secret")


def key_check(key: bytes, run: str) -> str:
    """A short value that nodes compare to find out whether they hold the same secret (it tells
    nothing about the secret itself)."""
    return hmac.new(key, b"dtrain job secret check " + run.encode(), hashlib.sha256).hexdigest()[:16]


def _read_private(path: Path, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SecretError(f"{what} {path}: {exc.strerror}; {_HINT}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SecretError(f"{what} {path} must be a regular file of user {os.getuid()} that nobody else can "
                              f"read (chmod 600 {path})")
        key = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(key) < _MIN_BYTES:
        raise SecretError(f"{what} {path} holds {len(key)} bytes, fewer than {_MIN_BYTES}; {_HINT}")
    return key


def _shared_file(path: Path) -> bytes:
    """Read ``path``, creating it (0600, whole content at once) when no node leader has yet."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_secret())
    try:
        os.link(tmp, path)  # fails if another node leader was first: then its secret counts
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _read_private(path, "job secret file")
