"""In-memory erasure-coded snapshots under per-kind zero levels (docs/hierarchical.md, issue 13 item 7).

2 nodes x 2 ranks through `dtrain launch` (the harness of test_snapshot.py). For each assignment,
a fault-free run and a run where rank 1 is killed after step 3 (restored from its local snapshot)
and then node 1 is lost after step 5 (rebuilt from parity) must end with the same ``param_sha256``:
bit-exact, since the example draws its batches from (seed, step) and the restored state is the
state of the restored step, whatever level each kind is split at. Each restart event is checked
too (where the state came from, which step), because a restart from step 0 would also match.

- ``hpz``: params/grads/optim global, the backward copy at node (the copy is not snapshotted: it is
  rebuilt from the first forward gather after the restore);
- ``mixed``: params and backward copy at node, grads and optimizer state global (kinds at different
  levels, so one rank's snapshot holds parts cut at two levels).
``hsdp`` (every kind at node) passed the same check by hand (2026-11-30 18:45) and stays in
``LAYOUTS``; it is left out of the suite for time.

Cost: two launches (one with two restarts) per assignment: 99-121 s per assignment at load
average 12-18 (all three passed at 2026-11-30 18:45, 325 s together); not yet timed on a quiet
machine.
"""
from __future__ import annotations

import pytest

from tests.dist.test_snapshot import LAG, _launch, _restarts, _summary

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]
STEPS = 6
FAULTS = ["kill:rank=1,step=3", "node-loss:node=1,step=5"]
LAYOUTS = {
    "hpz": ["zero.preset=\"hpz\""],
    "hsdp": ["zero.preset=\"hsdp\""],
    "mixed": ["zero.params=\"node\"", "zero.grads=\"global\"", "zero.optim=\"global\""],
}
EXPECTED_LEVELS = {
    "hpz": "params=global, grads=global, optim=global, backward_params=node",
    "hsdp": "params=node, grads=node, optim=node, backward_params=node",
}


@pytest.mark.parametrize("layout", ["hpz", "mixed"])
def test_snapshot_restore_is_bit_exact_under_levels(tmp_path, layout):
    sets = LAYOUTS[layout]
    rc, clean, log = _launch(tmp_path, f"{layout}-ok", 2, 2, sets=sets, steps=STEPS)
    assert rc == 0, log[-3000:]
    if layout in EXPECTED_LEVELS:
        assert EXPECTED_LEVELS[layout] in log  # the preset really applied (printed at start-up)
    rc, faulty, log = _launch(tmp_path, f"{layout}-faults", 2, 2, sets=sets, steps=STEPS, inject=FAULTS,
                              restarts=len(FAULTS))
    assert rc == 0, log[-3000:]
    assert _summary(faulty)["param_sha256"] == _summary(clean)["param_sha256"], log[-3000:]
    assert _summary(faulty)["steps"] == STEPS
    kill, node_loss = _restarts(faulty)
    assert "local snapshot" in kill["source"] and kill["resumed_from_step"] >= 3 - LAG, kill
    assert "parity rebuild of node(s) [1]" in node_loss["source"], node_loss
    assert node_loss["resumed_from_step"] >= 5 - LAG, node_loss
