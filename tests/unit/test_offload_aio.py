"""The NVMe tier's I/O (dtrain/offload/aio.py): aligned buffers, a write/read round trip through
the thread pool in chunks, and the buffered fallback when a filesystem refuses O_DIRECT (forced
here by making ``os.open`` answer EINVAL to the O_DIRECT flag, as tmpfs did before Linux 6.6).
Exact byte equality: the data is copied, never computed.

``offload.io`` (:class:`aio.IOChoice`): "threads" runs the pool; "auto" runs the pool where
DeepSpeed's op does not load (CI installs no DeepSpeed) and says why, else the faster engine of the
probe (or the thread pool where the filesystem refuses O_DIRECT); "async_io" without the op
raises. Where the op loads, the same round trip through :class:`aio.AsyncIO` (regions as small as
4096 bytes, at offsets) and the real probe, which runs in a child process."""
import errno
import os

import pytest
import torch

from dtrain.offload import aio


def test_aligned_round_trip_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(aio, "CHUNK", 8192)  # several preadv/pwritev calls per buffer
    buf = aio.aligned_buffer(3 * 8192 + 5)
    assert buf.numel() == 7 * 4096 and buf.numpy().ctypes.data % aio.ALIGN == 0
    buf.copy_(torch.randint(0, 256, (buf.numel(),), dtype=torch.uint8))
    f = aio.DirectFile(str(tmp_path / "u0.state"), buf.numel())
    io = aio.IOPool(2)
    try:
        io.write(f, buf)
        back = aio.aligned_buffer(buf.numel())
        io.read(f, back)
        assert torch.equal(back, buf) and io.read_bytes == io.write_bytes == buf.numel()
    finally:
        io.shutdown()
        f.close()


def test_buffered_fallback_when_o_direct_is_refused(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    f = aio.DirectFile(str(tmp_path / "u1.state"), 100)
    try:
        assert not f.direct and "O_DIRECT refused" in f.why_buffered and f.nbytes == 4096
    finally:
        f.close()


def _op_or_skip():
    try:
        return aio.load_async_io()
    except aio.AsyncIOUnavailable as exc:
        pytest.skip(f"DeepSpeed's async_io op does not load here: {exc}")


def _unavailable():
    raise aio.AsyncIOUnavailable("deepspeed is not importable (ImportError)")


def test_io_choice_without_the_op(tmp_path, monkeypatch):
    monkeypatch.setattr(aio, "load_async_io", _unavailable)
    monkeypatch.setattr(aio, "probe_rates", lambda directory, threads: {"unavailable": "deepspeed is not installed"})
    threads = aio.IOChoice("threads", 2)
    threads.resolve(tmp_path)
    auto = aio.IOChoice("auto", 2)
    auto.resolve(tmp_path)
    for choice in (threads, auto):
        engine = choice.engine(1 << 20)
        assert type(engine) is aio.IOPool and choice.name == "threads"
        engine.shutdown()
    assert auto.why == "deepspeed is not installed" and "preadv" in auto.describe()
    with pytest.raises(aio.AsyncIOUnavailable, match="not importable"):
        aio.IOChoice("async_io", 2).resolve(tmp_path)


@pytest.mark.parametrize("rates, chosen", [({"threads": 4e9, "async_io": 1e9}, "threads"),
                                           ({"threads": 1e9, "async_io": 2e9}, "async_io"),
                                           ({}, "threads")])
def test_auto_takes_the_faster_engine_of_the_probe(tmp_path, monkeypatch, rates, chosen):
    monkeypatch.setattr(aio, "probe_rates", lambda directory, threads: rates)
    choice = aio.IOChoice("auto", 2)
    choice.resolve(tmp_path)
    assert choice.name == chosen
    assert ("GB/s" in choice.why) if rates else ("O_DIRECT refused" in choice.why), choice.why


def test_async_io_round_trip_and_probe(tmp_path):
    op = _op_or_skip()
    io = aio.AsyncIO(2, op)
    f = aio.DirectFile(str(tmp_path / "u2.state"), 5 * 4096)
    try:
        buf = io.buffer(5 * 4096)
        assert buf.numel() == 5 * 4096 and buf.data_ptr() % aio.ALIGN == 0
        buf.copy_(torch.randint(0, 256, (buf.numel(),), dtype=torch.uint8))
        regions = [(buf[:4096], 0), (buf[4096:3 * 4096], 4096), (buf[3 * 4096:], 3 * 4096)]
        io.write(f, regions)
        back = io.buffer(5 * 4096)
        io.read(f, [(back[:2 * 4096], 3 * 4096), (back[2 * 4096:], 0)])  # other regions, other order
        assert torch.equal(back[:2 * 4096], buf[3 * 4096:]) and torch.equal(back[2 * 4096:], buf[:3 * 4096])
        assert io.read_bytes == io.write_bytes == buf.numel()
    finally:
        io.shutdown()
        f.close()
    rates = aio.probe_rates(tmp_path, 2)  # in a child process; the op is built (loaded above)
    assert set(rates) == {"threads", "async_io"} and min(rates.values()) > 0, rates
    assert not (tmp_path / "io-probe").exists()


def test_an_unclosed_async_io_engine_exits_cleanly(tmp_path):
    """A script that never closes its engine: the op's handles go at exit (``atexit``), not during
    the interpreter's finalization, where their joinable threads were destroyed (std::terminate,
    exit 134, in 1 of 6 runs before the fix, 2 of 5 in the benchmark)."""
    import subprocess
    import sys

    _op_or_skip()
    code = ("import sys, torch; from dtrain.offload import aio; io = aio.AsyncIO(2, aio.load_async_io()); "
            "f = aio.DirectFile(sys.argv[1], 8192); b = io.buffer(8192); io.write(f, b); io.read(f, b); print('ok')")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for i in range(4):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"x{i}")], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 0 and "ok" in proc.stdout and "terminate" not in proc.stderr, proc.stderr[-500:]
