"""Failure behaviour: a rank that skips a collective makes its peers fail with a named error."""
import time

import pytest
import torch

import dtrain
from dtrain.comm import CollectiveTimeout
from tests.dist.harness import run_world

pytestmark = pytest.mark.dist


def _skip_one_collective():
    runtime = dtrain.init({"comm": {"timeout_s": 3}})
    comm = runtime.comm
    comm.all_reduce(torch.ones(4))  # everyone takes part
    if runtime.rank == 1:
        time.sleep(8)  # rank 1 skips the next collective (stays alive, so it is a hang, not a crash)
        return "skipped"
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4))
    except CollectiveTimeout as exc:
        return {"error": str(exc), "after_s": time.monotonic() - start}
    return "completed"


def test_skipped_collective_times_out_with_named_error():
    results = run_world(_skip_one_collective, 2, timeout_s=60)
    assert results[1] == "skipped"
    err = results[0]
    assert isinstance(err, dict), err
    assert "rank 0" in err["error"] and "all_reduce" in err["error"] and "ranks [0, 1]" in err["error"]
    assert "within 3 s" in err["error"]
    assert 2.5 <= err["after_s"] < 8, err
