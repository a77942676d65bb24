"""The snapshot process's disk tier, process-free: its queue is bounded (a newer committed step
replaces the one waiting, counted as skipped, and the newest is the one written), and a failed
persist is counted and reported with the step and the error (what the ranks turn into a
``snapshot_persist_error`` metrics event, dtrain/plugins/snapshot.py), its partial files removed."""
import threading
import time
from pathlib import Path

from dtrain.snapshot.daemon import Daemon, StepState, parse_args


def _commit(daemon: Daemon, step: int, blob: Path) -> None:
    daemon.steps[step] = StepState(step, blobs={0: (str(blob), 4)}, table=[[0, 4, 0]], complete={0})
    daemon._maybe_commit(step)


def _drained(daemon: Daemon) -> None:
    deadline = time.monotonic() + 10
    while daemon.persist_q.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not daemon.persist_q.unfinished_tasks


def test_bounded_queue_and_reported_failure(tmp_path):
    blob = tmp_path / "r0.slot0"
    blob.write_bytes(b"abcd")
    disk = tmp_path / "disk"
    daemon = Daemon(parse_args(["--dir", str(tmp_path), "--node", "0", "--nodes", "1", "--k", "1", "--m", "0",
                                "--persist-dir", str(disk), "--persist-every", "1"]))
    for step in (1, 2, 3):  # the disk thread is not running yet: steps 1 and 2 wait in turn
        _commit(daemon, step, blob)
    assert daemon.persist_q.qsize() == 1 and daemon.persist_report["skipped"] == 2
    threading.Thread(target=daemon._persister, daemon=True).start()
    _drained(daemon)
    assert sorted(p.name for p in disk.iterdir()) == ["step-000000003"]
    assert (disk / "step-000000003" / "rank0.bin").read_bytes() == b"abcd"
    assert daemon.persist_report["newest"] == 3 and daemon.persist_report["failed"] == 0

    (disk / "step-000000004").write_text("a file where the step's directory goes")
    _commit(daemon, 4, blob)
    _drained(daemon)
    report = daemon.persist_report
    assert (report["failed"], report["error_step"], report["newest"]) == (1, 4, 3)
    assert "node 0: persisting step 4" in report["error"] and "step-000000004" in report["error"]
