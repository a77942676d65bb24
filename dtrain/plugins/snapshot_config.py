"""The ``snapshot`` plugin's config section (torch-free, so the launcher can validate it before any
rank starts). :class:`dtrain.plugins.snapshot.SnapshotPlugin` declares it as its nested ``Config``."""
from __future__ import annotations

from dataclasses import dataclass

from dtrain.config import register_section, require


@dataclass(kw_only=True)
class SnapshotConfig:
    """In-memory snapshots held by one snapshot process per node, erasure coded across nodes."""

    enabled: bool = False
    every: int = 1
    """Snapshot every this many steps."""
    ec_data: int = 0
    """k: data nodes per coding group; 0 = every node of the job not used for parity."""
    ec_parity: int = 1
    """m: parity nodes per coding group (any m lost nodes of a group are rebuilt); capped at nodes - 1."""
    persist_every: int = 0
    """Write every this many steps' committed snapshot to ``persist_dir`` in the background; 0 = never."""
    persist_dir: str | None = None
    timeout_s: float = 60.0
    """How long a snapshot may wait for the previous one to commit before the rank gives up."""
    idle_s: float = 120.0
    """A snapshot process with no rank connected for this long exits (the job is gone)."""
    run_id: str | None = None
    """Names the job's snapshot processes; default: the launcher's run id."""
    host: str | None = None
    """Address the snapshot process listens on for its peers; default: this node's gloo address."""

    def validate(self) -> None:
        require(self.every >= 1, "snapshot.every", self.every, "an integer >= 1")
        require(self.ec_data >= 0, "snapshot.ec_data", self.ec_data, "an integer >= 0 (0 = automatic)")
        require(self.ec_parity >= 0, "snapshot.ec_parity", self.ec_parity, "an integer >= 0")
        require(self.persist_every >= 0, "snapshot.persist_every", self.persist_every, "an integer >= 0")
        require(self.persist_every == 0 or self.persist_dir is not None, "snapshot.persist_dir",
                 self.persist_dir, "a directory path when snapshot.persist_every > 0")
        require(self.timeout_s > 0, "snapshot.timeout_s", self.timeout_s, "a positive number of seconds")
        require(self.idle_s > 0, "snapshot.idle_s", self.idle_s, "a positive number of seconds")


register_section("snapshot", SnapshotConfig)
