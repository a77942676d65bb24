"""What ``dtrain launch`` checks before it starts a rank: the run's config and where metrics go.

A config mistake (unknown key, wrong type, impossible value, unreadable ``--config`` file) is a
:class:`dtrain.ConfigError` here, reported by the CLI as one line with exit status 2 before any
rank or fork server exists. Torch-free, so that takes a fraction of a second. Settings a script
adds itself (``dtrain.wrap(config=..., overrides=...)``) are checked by its ranks, which report a
ConfigError once per job (dtrain/launch/bootstrap.py).
"""
from __future__ import annotations

import importlib.util
import os

from dtrain.config import Config, ConfigError

__all__ = ["check_config_up_front", "metrics_destination"]


def check_config_up_front(source: str | None, overrides: list[str], metrics: str | None = None,
                          nodes: int | None = None, nproc: int | None = None, local: bool = False) -> Config:
    """The run's validated Config from ``--config`` and every ``--set``; raises ConfigError.

    ``metrics`` is ``--metrics``: it must be a file path whose directory can be created. The
    config is loaded by exactly one call, :meth:`dtrain.config.Config.load`. A section no plugin
    registered in this process may belong to a plugin the script defines: it is checked by the
    ranks (unless its name is a near miss of a known section, an error here). With ``nodes`` and
    ``nproc`` the declared ``topology.levels`` are checked against that world. ``local`` (the ranks
    run on this machine) also makes sure ``checkpoint.dir`` and ``snapshot.persist_dir`` can be
    created and written, by creating them and a probe file, as root too (where ``access`` says yes
    to everything).
    """
    config = Config.load(source, overrides, defer_unknown_sections=True)
    if nodes is not None and nproc is not None:
        from dtrain.topology import Shape

        from dtrain.hierarchy import check_zero_config

        shape = Shape.of(nodes * nproc, 0, config.topology.nodes or nodes, config.topology.levels)
        check_zero_config(config.zero, shape)  # per-kind zero levels against this world
    path = metrics_destination(config, metrics)
    if path is not None:
        _check_writable_file(path, "metrics.path" if config.metrics.path else "--metrics")
    if local:
        for name, directory in (("checkpoint.dir", config.checkpoint.dir),
                                ("snapshot.persist_dir", getattr(getattr(config, "snapshot", None), "persist_dir", None))):
            if directory:
                _probe_dir(str(directory), name)
    if config.metrics.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"metrics.tensorboard = {config.metrics.tensorboard!r} needs TensorBoard: "
                          "pip install 'dtrain[tensorboard]' (or drop metrics.tensorboard)")
    return config


def metrics_destination(config: Config, metrics: str | None) -> str | None:
    """The metrics file rank 0 will write: ``metrics.path`` wins over ``--metrics`` (as in the engine)."""
    path = config.metrics.path or metrics
    return os.path.abspath(path) if path else None


def _probe_dir(directory: str, name: str) -> None:
    """Create ``directory`` (as the run would) and a file in it; a failure is one ConfigError."""
    import tempfile

    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dtrain-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{name} {directory!r} cannot be written ({exc.strerror}); pick a writable "
                          "directory") from None


def _check_writable_file(path: str, name: str) -> None:
    if os.path.isdir(path):
        raise ConfigError(f"{name} {path!r} is a directory; pass a file path such as runs/train.jsonl")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):  # the writer creates the missing directories
        parent = os.path.dirname(parent)
    if parent and (not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK)):
        raise ConfigError(f"{name} {path!r} cannot be written: {parent!r} is not a writable directory")
    if parent and os.geteuid() == 0 and not _writable_as_root(parent):  # root: access() says yes
        raise ConfigError(f"{name} {path!r} cannot be written: {parent!r} is not a writable directory")


def _writable_as_root(directory: str) -> bool:
    """Whether a file can be created in ``directory`` (a probe, deleted at once)."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".dtrain-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True
