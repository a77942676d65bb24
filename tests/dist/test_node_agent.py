"""The Ray launcher's node agent without Ray.

``NodeAgent`` is a plain class that the driver wraps with ``ray.remote``; its rank handling
(start, poll, kill, stop) needs no Ray, so it is exercised here directly: each rank gets exactly
its environment and arguments and runs the script as ``__main__``, its output comes back per
stream, exit codes and signals are reported, an exception's traceback appears once, a killed
rank reports its signal, and ``stop`` ends a running rank with SIGTERM.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from dtrain.launch.ray_agent import NodeAgent

pytestmark = pytest.mark.dist

SCRIPT = """
import os, sys, time
print("OUT", os.environ["RANK"], os.environ.get("ONLY_RANK1", "-"), sys.argv[1:], __name__, flush=True)
print("ERR", os.environ["RANK"], file=sys.stderr, flush=True)
if os.environ["RANK"] == "1":
    raise ValueError("boom")
if os.environ["RANK"] == "2":
    time.sleep(600)
"""


def _until_exited(agent: NodeAgent, ranks: set[int], timeout_s: float = 60.0) -> tuple[dict, dict, dict]:
    out: dict[int, bytes] = {}
    err: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        res = agent.poll()
        for r, data in res.stdout.items():
            out[r] = out.get(r, b"") + data
        for r, data in res.stderr.items():
            err[r] = err.get(r, b"") + data
        exits = {e.rank: e.exitcode for e in res.exited}
        if ranks <= set(exits) or time.monotonic() > deadline:
            return out, err, exits
        time.sleep(0.05)


def test_ranks_get_their_env_output_and_exit_status(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    agent = NodeAgent(0)
    try:
        agent.start([str(script), "a", "b"], {0: {"RANK": "0"}, 1: {"RANK": "1", "ONLY_RANK1": "yes"},
                                              2: {"RANK": "2"}})
        out, err, exits = _until_exited(agent, {0, 1})
        assert exits[0] == 0 and exits[1] == 1, (exits, err)
        assert b"OUT 0 - ['a', 'b'] __main__" in out[0]
        assert b"OUT 1 yes ['a', 'b'] __main__" in out[1]  # one rank's variables stay its own
        assert b"ERR 0" in err[0]
        assert err[1].count(b"Traceback (most recent call last)") == 1 and b"ValueError: boom" in err[1]
        assert agent.kill_rank(2, int(signal.SIGKILL)) > 0
        _, _, exits = _until_exited(agent, {2})
        assert exits[2] == -int(signal.SIGKILL)
        agent.start([str(script)], {2: {"RANK": "2"}})  # a new attempt on the same agent
        agent.poll()
        final = agent.stop(grace_s=5.0)
        assert [(e.rank, e.exitcode) for e in final.exited] == [(2, -int(signal.SIGTERM))]
    finally:
        agent.stop()
