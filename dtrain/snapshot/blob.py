"""One rank's snapshot as a flat byte blob: written straight into shared memory, read back in place.

Layout: ``MAGIC`` (8 bytes), header length (8 bytes, little endian), the JSON header, zero
padding to 64 bytes, then every tensor's bytes at the 64-byte-aligned offset the header names.
The header carries the step, the rank, the run fingerprint, and the same ``meta``/``info`` a disk
checkpoint stores (:class:`dtrain.checkpoint.RankState`), so a blob restores through
:func:`dtrain.checkpoint.load` like a checkpoint does. Nothing is ever unpickled.

The Mersenne Twister words of the python and numpy RNG states (624 each) travel as binary
tensors (``rng.python.words``, ``rng.numpy.words``) rather than as JSON numbers: a blob is laid
out every training step, and encoding ~1,250 integers as text was most of that.
"""
from __future__ import annotations

import json
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dtrain.checkpoint import CheckpointError, RankState, StateReader, to_json
from dtrain.snapshot.coding import checksum

MAGIC = b"DTSNAP03"  # bump whenever the header changes: older blobs are refused, not misread
_ALIGN = 64

__all__ = ["BlobPlan", "plan", "write", "BlobReader", "checksum", "SnapshotMismatch"]


class SnapshotMismatch(CheckpointError):
    """A snapshot was written by a different run, world size or configuration."""


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


_RNG_WORDS = {"python": 1, "numpy": 1}  # info key -> index of the state's word array in it


@dataclass
class BlobPlan:
    header: bytes
    data_start: int
    offsets: dict[str, int]
    nbytes: int
    words: dict[str, torch.Tensor] = field(default_factory=dict)  # RNG words, written as tensors


def _rng_words(info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``info`` without the RNG states' word arrays, and those arrays as int32 tensors (the bits of
    the uint32 words)."""
    info, words = dict(info), {}
    for key, index in _RNG_WORDS.items():
        if key not in info:
            continue
        state = list(info[key])
        raw = state[index]
        as_u32 = raw if isinstance(raw, np.ndarray) else np.frombuffer(array("I", raw), dtype=np.uint32)
        words[f"rng.{key}.words"] = torch.from_numpy(np.ascontiguousarray(as_u32, dtype=np.uint32).view(np.int32))
        state[index] = None
        info[key] = state
    return info, words


def _loose_tensors(state: RankState, words: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The blob's whole tensors after the flat ones: frozen parameters and buffers, RNG words."""
    return {"extra." + name: tensor for name, tensor in state.extra.items()} | words


def plan(state: RankState, step: int, rank: int, fingerprint: str, part: int = 0) -> BlobPlan:
    """Where each tensor of ``state`` goes; the header is final, so the size is known up front."""
    offsets: dict[str, int] = {}
    table: list[list[Any]] = []
    cursor = 0
    info, words = _rng_words(state.info)
    for name, flat in state.tensors.items():
        offsets[name] = cursor
        table.append([name, _dtype_name(flat.dtype), flat.numel, list(flat.shape or (flat.numel,)), cursor])
        cursor = _align(cursor + flat.nbytes)
    for name, tensor in _loose_tensors(state, words).items():
        offsets[name] = cursor
        table.append([name, _dtype_name(tensor.dtype), tensor.numel(), list(tensor.shape), cursor])
        cursor = _align(cursor + tensor.numel() * tensor.element_size())
    header = to_json({"step": step, "rank": rank, "part": part, "fingerprint": fingerprint, "meta": state.meta,
                      "info": info, "tensors": table}).encode()
    data_start = _align(16 + len(header))
    return BlobPlan(header, data_start, offsets, data_start + cursor, words)


def write(buffer: Any, state: RankState, blob: BlobPlan) -> None:
    """Copy ``state`` into ``buffer`` (a writable buffer of at least ``blob.nbytes``)."""
    view = memoryview(buffer)
    view[:8] = MAGIC
    view[8:16] = struct.pack("<Q", len(blob.header))
    view[16:16 + len(blob.header)] = blob.header
    view[16 + len(blob.header):blob.data_start] = bytes(blob.data_start - 16 - len(blob.header))
    for name, flat in state.tensors.items():
        out = _tensor_at(buffer, flat.dtype, flat.numel, blob.data_start + blob.offsets[name])
        if sum(src.numel() for _, src in flat.pieces) != flat.numel:
            out.zero_()  # padding the pieces do not cover
        flat.copy_into(out)
    for name, tensor in _loose_tensors(state, blob.words).items():
        out = _tensor_at(buffer, tensor.dtype, tensor.numel(), blob.data_start + blob.offsets[name])
        out.copy_(tensor.reshape(-1))


def _tensor_at(buffer: Any, dtype: torch.dtype, numel: int, offset: int) -> torch.Tensor:
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=offset)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Part:
    """One rank's tensors, in the interface :class:`StateReader` expects of a part."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def keys(self) -> list[str]:
        return [k for k in self.tensors if not k.startswith("extra.")]

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key].clone()

    def get_slice(self, key: str) -> torch.Tensor:
        return self.tensors[key]


class BlobReader(StateReader):
    """A rank's blob as a :class:`StateReader` (tensors are views into ``buffer``; no copy)."""

    def __init__(self, buffer: Any, where: str = "snapshot") -> None:
        self.where_saved = where
        view = memoryview(buffer)
        if bytes(view[:8]) != MAGIC:
            raise CheckpointError(f"{where} is not a snapshot blob of this dtrain version "
                                  f"(format {bytes(view[:8])!r}, expected {MAGIC!r})")
        (length,) = struct.unpack("<Q", view[8:16])
        header = json.loads(bytes(view[16:16 + length]))
        self.step: int = header["step"]
        self.rank: int = header["rank"]
        self.part_index: int = header["part"]  # this rank's index in the group its layout shards over
        self.sample_rank = self.part_index
        self.fingerprint: str = header["fingerprint"]
        self.meta = header["meta"]
        self._index()
        start = _align(16 + length)
        tensors = {}
        for name, dtype, numel, shape, offset in header["tensors"]:
            t = _tensor_at(buffer, getattr(torch, dtype), numel, start + offset)
            tensors[name] = t.view(shape)
        self.info = header["info"]
        for key, index in _RNG_WORDS.items():
            words = tensors.pop(f"rng.{key}.words", None)
            if words is not None:
                self.info[key][index] = words.numpy().view(np.uint32).tolist()
        self._part = _Part(tensors)

    def part(self, rank: int) -> _Part:
        """This blob's tensors: asked for by part index (unit ranges) or by global rank (RNG, plugins)."""
        if rank not in (self.rank, self.part_index) and self.meta["parts"] != 1:
            raise CheckpointError(f"{self.where_saved} holds rank {self.rank}'s shard, not part {rank}; "
                                  f"a snapshot restores only into the layout and world size that wrote it")
        return self._part

    def rank_info(self, rank: int) -> dict[str, Any]:
        return self.info

    def extra(self) -> dict[str, torch.Tensor]:
        return {k[len("extra."):]: v for k, v in self._part.tensors.items() if k.startswith("extra.")}
