"""The NVMe tier's chunked stream (dtrain/offload/store.py, "Chunks"): units cut into chunks
smaller than a parameter, stepped as sub-parameters, give the in-memory run's bytes.

One world-1 run (ZeRO-3, the tiny GPT, gradient accumulation 2, 10 steps) with the chunk forced to
1024 elements (so nearly every parameter is cut, and a chunk holds the tails of one parameter and
the heads of the next), with and without global-norm clipping. The promise is bit-identity
(each element gets the same float32 arithmetic; chunk starts keep the SIMD lane positions), so the
check is exact: ``param_sha256`` and every byte of the optimizer state read back from the files
through ``layout.shards``. A cut piece's sub-step that used a stale ``step``, skipped a chunk,
wrote a chunk to the wrong offset or lost a deferred write changes them. The clipped run also
saves at step 5 (a save must wait for the deferred writes) and a fresh chunked run resumes from
that checkpoint and must end on the same bytes.

``offload.overlap = false`` (ZeRO-Infinity's order, no clipping) runs the same chunked stream after
backward: the same bytes, and after every ``train_step`` no write is pending (every write landed
inside the step), where the overlapped run leaves its last writes to the next forward; and the
layout reports each unit to the tier as soon as its reduction has completed (here at once: the
first report comes when one unit is reduced, not after three). Switching between the two orders
between steps (``OffloadPlugin.set_overlap``, what ``benchmarks/offload.py --variants
nvme-alternate`` does) keeps the bytes, and each step leaves pending only what its own order leaves.
Between steps no gradient part holds storage: the tier hands each stepped unit's gradient to
``layout.release_grad``, and the bytes above show it comes back zeroed when next written.
"""
import os

import pytest

from tests.dist.harness import run_world
from tests.dist.test_offload import SAVE_AT, STEPS, _config, _result, _train, _usage_error
from tests.dist.workloads import local_batch

pytestmark = pytest.mark.dist


def _world1(root: str) -> dict:
    import dtrain.offload.placement as placement

    placement.CHUNK_BYTES_PER_KEY = 4096  # 1024-element chunks: every parameter larger than that is cut
    out: dict = {}
    for clip in (1.0, None):
        out["memory", clip] = _result(_train(_config(3, None, clip, root), 0, STEPS))
        save = f"{root}/ckpt" if clip else None
        engine = _train(_config(3, "nvme", clip, root), 0, STEPS, save=save)
        store = engine.plugins[1].store
        out["chunks", clip] = (sum(len(u.chunks) for u in store.units.values()), len(store.units),
                               sum(not p.whole for u in store.units.values() for c in u.chunks for p in c.parts))
        out["nvme", clip] = _result(engine)
    out["resumed"] = _result(_train(_config(3, "nvme", 1.0, root), SAVE_AT, STEPS, load=f"{root}/ckpt"))
    for overlap in (False, True):
        engine = _train(_config(3, "nvme", None, root, overlap=overlap), 0, 1)
        layout, report = engine.layout, engine.layout.unit_reduced
        seen: list[int] = []  # how many units were reduced when each unit was reported

        def spy(unit, report=report, layout=layout, seen=seen):
            seen.append(len(layout.reduced))
            report(unit)
        layout.unit_reduced = spy
        pending, grad_bytes = [], []
        for step in range(1, STEPS):
            engine.train_step(local_batch(step, 0, 1))
            pending.append(len(engine.plugins[1].pipe.pending))
            grad_bytes.append(sum(piece.tensor.untyped_storage().nbytes()
                                  for shard in layout.shards("grad") for piece in shard.pieces))
        out["pending", overlap] = pending
        out["grad_bytes", overlap] = grad_bytes
        out["reported_at", overlap] = seen[:len(engine.plugins[1].store.units)]
        out["overlap", overlap] = _result(engine)
    engine = _train(_config(3, "nvme", None, root), 0, 1)  # set_overlap between steps (the benchmark's A/B)
    plugin, pending = engine.plugins[1], []
    for step in range(1, STEPS):
        plugin.set_overlap(step % 2 == 0)
        engine.train_step(local_batch(step, 0, 1))
        pending.append((step % 2 == 0, len(plugin.pipe.pending)))
    out["pending", "alternate"] = pending
    out["overlap", "alternate"] = _result(engine)
    return out


def test_chunked_nvme_tier_is_bit_identical(tmp_path):
    out = run_world(_world1, 1, str(tmp_path), timeout_s=300)[0]
    for clip in (1.0, None):
        chunks, units, cut = out["chunks", clip]
        assert chunks > 4 * units and cut > units, out["chunks", clip]
        assert out["nvme", clip] == out["memory", clip], clip
    assert out["resumed"] == out["memory", 1.0]
    assert out["overlap", False] == out["overlap", True] == out["memory", None]
    assert out["pending", False] == [0] * (len(out["pending", False])), out["pending", False]
    # every stepped unit's gradient is released (layout.release_grad) and comes back zeroed when next written
    assert out["grad_bytes", False] == out["grad_bytes", True] == [0] * (STEPS - 1), out["grad_bytes", True]
    # switching order between steps keeps the bytes, and each step leaves what its own order leaves
    assert out["overlap", "alternate"] == out["memory", None]
    assert all((n > 0) == overlapped for overlapped, n in out["pending", "alternate"]), out["pending", "alternate"]
    assert min(out["pending", True]) > 0, out["pending", True]
    # a finished reduction is reported at once (world 1: each is done when issued), not two units later
    assert out["reported_at", True][:2] == [1, 2], out["reported_at", True]


def _async_io_world1(root: str) -> dict:
    """The same chunked stream through each I/O engine (offload.io), and the engine's errors."""
    import dtrain.offload.aio as aio
    import dtrain.offload.placement as placement

    placement.CHUNK_BYTES_PER_KEY = 4096  # 4096-byte regions: the op's smallest aligned request
    out: dict = {"memory": _result(_train(_config(3, None, None, root), 0, STEPS))}
    for io in ("async_io", "threads"):
        engine = _train(_config(3, "nvme", None, root, io=io), 0, STEPS)
        out["engine", io] = (type(engine.plugins[1].store.io).__name__, engine.plugins[1].metrics()["offload_async_io"])
        out[io] = _result(engine)
    engine = _train(_config(3, "nvme", 1.0, root, io="async_io", params="nvme"), 0, STEPS)
    out["params_engine"] = type(engine.plugins[1].params.io).__name__
    out["params"] = _result(engine)
    out["params_memory"] = _result(_train(_config(3, None, 1.0, root), 0, STEPS))
    real = aio.lockable_bytes
    aio.lockable_bytes = lambda: 4096  # staging buffers cannot be locked: "async_io" errs, "auto" takes the pool
    out["locked_error"] = _usage_error(_config(3, "nvme", None, root, io="async_io"))
    aio.IOChoice.resolve = lambda self, directory: setattr(self, "name", "async_io")  # as if the probe chose it
    engine = _train(_config(3, "nvme", None, root, io="auto"), 0, 1)
    out["locked_auto"] = (type(engine.plugins[1].store.io).__name__, engine.plugins[1].io.why)
    engine.close()
    aio.lockable_bytes = real

    def missing() -> None:
        raise aio.AsyncIOUnavailable("deepspeed is not importable (ImportError)")
    aio.load_async_io = missing
    out["missing_error"] = _usage_error(_config(3, "nvme", None, root, io="async_io"))
    out["left_behind"] = sorted(n for n in os.listdir(root) if n.startswith("dtrain-offload-"))
    return out


def test_async_io_engine_is_bit_identical(tmp_path):
    """``offload.io = "async_io"`` (DeepSpeed's libaio op) moves the same bytes as the thread pool:
    optimizer state in 4096-byte regions, and parameter parts (``offload.params = "nvme"``, with
    clipping), each equal to the in-memory run. Where the op cannot run, "async_io" is one
    UsageError line naming why (buffers past RLIMIT_MEMLOCK, deepspeed missing) and "auto" runs
    the thread pool and says why. Skips where DeepSpeed's op does not load (CI installs no
    DeepSpeed; tests/unit/test_offload_aio.py covers the choice there)."""
    from dtrain.offload.aio import AsyncIOUnavailable, load_async_io

    try:
        load_async_io()
    except AsyncIOUnavailable as exc:
        pytest.skip(f"DeepSpeed's async_io op does not load here: {exc}")
    out = run_world(_async_io_world1, 1, str(tmp_path), timeout_s=300)[0]
    assert out["async_io"] == out["threads"] == out["memory"]
    assert out["engine", "async_io"] == ("AsyncIO", 1.0) and out["engine", "threads"] == ("IOPool", 0.0)
    assert out["params_engine"] == "AsyncIO" and out["params"] == out["params_memory"]
    for key, why in (("locked_error", "RLIMIT_MEMLOCK allows 0 MiB (raise it with ulimit -l)"),
                     ("missing_error", "deepspeed is not importable")):
        msg = out[key]
        assert msg.startswith('offload.io = "async_io" cannot run on rank 0: ') and why in msg, msg
        assert "\n" not in msg and 'offload.io = "auto"' in msg, msg
    assert out["locked_auto"][0] == "IOPool" and "RLIMIT_MEMLOCK" in out["locked_auto"][1], out["locked_auto"]
    assert out["left_behind"] == []
