"""The NVMe tier's I/O (dtrain/offload/aio.py): aligned buffers, a write/read round trip through
the thread pool in chunks, and the buffered fallback when a filesystem refuses O_DIRECT (forced
here by making ``os.open`` answer EINVAL to the O_DIRECT flag, as tmpfs did before Linux 6.6).
Exact byte equality: the data is copied, never computed."""
import errno
import os

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
