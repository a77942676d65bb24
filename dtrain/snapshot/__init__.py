"""In-memory snapshots: per-node snapshot processes, erasure coding across nodes, a disk tier.

* :mod:`dtrain.snapshot.blob` -- one rank's state as a flat, checksummed byte blob;
* :mod:`dtrain.snapshot.coding` -- stripe placement and parity (zfec, numpy XOR for m = 1);
* :mod:`dtrain.snapshot.daemon` -- the snapshot process of one node;
* :mod:`dtrain.snapshot.client` -- a rank's connection to it, and the job's run directory;
* :mod:`dtrain.snapshot.recovery` -- which step to restore from where.

The engine side is the ``snapshot`` plugin (:mod:`dtrain.plugins.snapshot`).
"""
