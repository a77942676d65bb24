"""Where each unit's element-wise optimizer state rests between steps, and how it is brought in.

A :class:`UnitStore` covers one unit's range ``[lo, hi)`` on this rank (its optimizer pieces,
read through ``layout.optimizer_pieces()``). Between steps the optimizer's state dict holds, for
each piece and element-wise key, the *at-rest* tensor:

* ``nvme``: a view of a memory map of the unit's state file (``<dir>/u{i}.state``: one
  4096-aligned stride per key), so checkpoints, snapshots and ``layout.shards("optim.<key>")``
  read the state through the usual descriptors without a full copy in memory; the step itself
  never touches the map: the file is read with ``O_DIRECT`` into a staging buffer set, stepped,
  and written back from it (dtrain/offload/aio.py);
* ``host`` on an accelerator: a host tensor; the step copies it to the device and back;
* ``host`` on a CPU device and ``device``: the optimizer's own tensors (nothing moves).

Each unit has its own tier (:func:`dtrain.offload.placement.place_units` keeps some units
``device``-resident under ``offload.memory_budget_gb``); only the NVMe units have files and use
the staging pool, which is sized from the largest of them.

**Chunks.** An NVMe unit is streamed in :class:`Chunk` s of at most ``chunk_elems`` elements
(a multiple of 1024, so each chunk starts 4096-aligned in every key's stride of the file): the
staging pool holds a few chunk-sized buffer sets, not whole units, so a small budget still gets a
read / step / write pipeline. A piece (one optimizer parameter) that a chunk boundary cuts is
stepped as *sub-parameters*: a flat view of the parameter's elements in the chunk, its gradient's
matching view as ``.grad``, and a state dict of staging views plus copies of the piece's scalar
state (Adam's ``step``); after the piece's last chunk is written, its state points at the file
again and takes the scalars of that last sub-step. The optimizer does the same arithmetic per
element on a view as on the whole tensor (element-wise ops; chunk starts keep the SIMD lane
positions, 1024 | start), so this is bit-identical too (tests/dist/test_offload_chunks.py).

A state tensor that is not the at-rest one (first step: absent; after ``load``: a fresh tensor
the checkpoint assembled) is *adopted*: copied into the staging buffers and written out, so a
load or a reshard needs nothing from the tier. State files are scratch: a checkpoint never points
at them, so a failed write can always be recovered from the last checkpoint.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dtrain.offload.aio import DirectFile, IOChoice, IOPool, round_up
from dtrain.partition import Piece, UnitSpec

F32 = 4


class TierState(dict):
    """One optimizer parameter's state dict under the NVMe (or accelerator host) tier: outside a
    step, assigning an element-wise state tensor (``dtrain.checkpoint.load`` does) writes it
    through into its at-rest place, so a load holds one piece in memory at a time, not the whole
    state."""

    def __init__(self, initial: dict, unit: "UnitStore", piece: Piece) -> None:
        super().__init__()
        self.unit, self.piece = unit, piece
        for k, v in initial.items():
            self[k] = v

    def __setitem__(self, key: str, value) -> None:
        home = self.unit.at_rest.get((id(self.piece.tensor), key))
        if (home is not None and not self.unit.stepping and torch.is_tensor(value) and value is not home
                and value.numel() == home.numel()):
            home.copy_(value.detach().reshape(home.shape))
            value = home
        super().__setitem__(key, value)


@dataclass(eq=False)
class UnitStore:
    """One unit's optimizer pieces on this rank and the home of their element-wise state."""

    spec: UnitSpec
    lo: int
    hi: int
    pieces: list[Piece]
    keys: list[str]
    tier: str
    """Where this unit's state rests: "device", "host" or "nvme"."""
    moves: bool = False
    """Whether its state is brought in for a step and taken out after it (nvme; host on an accelerator)."""
    file: DirectFile | None = None
    stepping: bool = False
    """Between ``bring_in`` and ``settle``: the optimizer's state points at working tensors."""
    at_rest: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    """(id(piece tensor), key) -> the tensor the optimizer state holds between steps."""
    chunks: list["Chunk"] = field(default_factory=list)
    """What one pipeline stage moves and steps: the whole unit, or (NVMe) ``chunk_elems`` slices."""

    @property
    def stride(self) -> int:
        """Bytes per key in the state file and in a staging buffer set (4096-aligned)."""
        return round_up((self.hi - self.lo) * F32)

    @property
    def state_bytes(self) -> int:
        return len(self.keys) * sum(p.hi - p.lo for p in self.pieces) * F32

    def views(self, flat: torch.Tensor, piece: Piece, key: str) -> torch.Tensor:
        """The slice of ``flat`` (a float32 image of the file: keys x stride) holding ``piece``'s ``key``."""
        base = self.keys.index(key) * (self.stride // F32) + piece.lo - self.lo
        return flat[base:base + piece.hi - piece.lo].view(piece.tensor.shape)

    def split(self, chunk_elems: int | None) -> None:
        """Cut the unit into chunks of ``chunk_elems`` elements (None: one chunk)."""
        step = chunk_elems or (self.hi - self.lo)
        self.chunks = []
        for a in range(self.lo, self.hi, max(step, 1)):
            b = min(a + step, self.hi)
            parts = [Part(p, max(a, p.lo) - p.lo, min(b, p.hi) - p.lo) for p in self.pieces if p.lo < b and p.hi > a]
            if parts:
                self.chunks.append(Chunk(self, a, b, parts))


@dataclass(eq=False)
class Part:
    """Elements ``[x, y)`` (piece-local) of one piece inside a chunk."""

    piece: Piece
    x: int
    y: int

    @property
    def whole(self) -> bool:
        return self.x == 0 and self.y == self.piece.hi - self.piece.lo

    @property
    def last(self) -> bool:
        """The piece's last chunk: its state is complete once this chunk is written."""
        return self.y == self.piece.hi - self.piece.lo


@dataclass(eq=False)
class Chunk:
    """Elements ``[a, b)`` of a unit's shard range: one read, one optimizer call, one write."""

    unit: UnitStore
    a: int
    b: int
    parts: list[Part]
    subs: dict[int, tuple[Part, torch.Tensor]] = field(default_factory=dict)
    """id(sub-parameter) -> (its part, the sub-parameter), while a cut piece is being stepped."""
    scalars: dict[int, dict] = field(default_factory=dict)
    """id(piece tensor) -> a cut piece's non-element-wise state after its sub-step (``step``)."""
    stepped: dict[int, list[str]] = field(default_factory=dict)
    """id(piece tensor) -> the element-wise keys its sub-step left in the staging buffers."""

    def view(self, flat: torch.Tensor, set_stride: int, part: Part, key: str) -> torch.Tensor:
        """``part``'s ``key`` in a staging buffer set (``flat``: float32, one ``set_stride`` per key), flat."""
        base = self.unit.keys.index(key) * (set_stride // F32) + part.piece.lo + part.x - self.a
        return flat[base:base + part.y - part.x]

    def regions(self, buf: torch.Tensor, set_stride: int) -> list[tuple[torch.Tensor, int]]:
        """(staging bytes, file offset) per key: the aligned extents one read or write moves."""
        u, n = self.unit, round_up((self.b - self.a) * F32)
        return [(buf[k * set_stride:k * set_stride + n], k * u.stride + (self.a - u.lo) * F32)
                for k in range(len(u.keys))]


class TierStore:
    """Every unit's :class:`UnitStore`, the staging buffer pool and the I/O threads."""

    def __init__(self, layout, tier: str, keys: list[str], directory: Path | None, io: IOChoice,
                 buffer_sets: int, unit_tiers: dict[int, str] | None = None, chunk_elems: int | None = None) -> None:
        """``tier``: the offload tier; ``unit_tiers``: unit index -> tier where it differs (resident
        units); ``chunk_elems``: elements per NVMe chunk (a multiple of 1024; None: whole units)."""
        self.layout, self.tier, self.keys = layout, tier, keys
        self.optimizer = layout.optimizer
        by_unit: dict[int, list[Piece]] = {}
        for spec, piece in layout.optimizer_pieces():
            by_unit.setdefault(spec.index, []).append(piece)
        _, parts, index = layout.placement("master")
        self.units: dict[int, UnitStore] = {}
        for spec in layout.unit_specs():
            lo, hi = spec.shard_range(parts, index)
            pieces = by_unit.get(spec.index, [])
            if pieces:
                self.units[spec.index] = UnitStore(spec, lo, hi, pieces, keys, (unit_tiers or {}).get(spec.index, tier))
        listed = {id(p.tensor) for ps in by_unit.values() for p in ps}
        self.placeholders = [[p for p in g["params"] if id(p) not in listed] for g in self.optimizer.param_groups]
        on_cpu = self._device().type == "cpu"
        for u in self.units.values():
            u.moves = u.tier == "nvme" or (u.tier == "host" and not on_cpu)
            cut = u.tier == "nvme" and all(p.tensor.is_contiguous() for p in u.pieces)
            u.split(chunk_elems if cut else None)
        nvme = [u for u in self.units.values() if u.tier == "nvme"]
        self.io: IOPool | None = None
        self.directory = directory
        self.buffer_sets = buffer_sets if nvme else 0
        self.set_stride = max((round_up((c.b - c.a) * F32) for u in nvme for c in u.chunks), default=0)
        """Bytes per key in a staging buffer set: the largest chunk, 4096-aligned."""
        self.set_bytes = self.set_stride * len(keys)
        self.pool: list[torch.Tensor] = []
        if nvme:
            assert directory is not None
            for u in nvme:
                u.file = DirectFile(str(directory / f"u{u.spec.index}.state"), u.stride * len(keys))
                mapped = u.file.mapped()[:u.stride * len(keys) // F32]
                for piece in u.pieces:
                    for key in keys:
                        u.at_rest[(id(piece.tensor), key)] = u.views(mapped, piece, key)
            self.io = io.engine(self.set_bytes * self.buffer_sets)
            self.pool = [self.io.buffer(self.set_bytes) for _ in range(self.buffer_sets)]
        for u in self.units.values():
            if u.moves:
                for piece in u.pieces:
                    self.optimizer.state[piece.tensor] = TierState(self.optimizer.state.get(piece.tensor, {}), u, piece)

    def _device(self) -> torch.device:
        first = next(iter(self.units.values()), None)
        return first.pieces[0].tensor.device if first else torch.device("cpu")

    @property
    def direct(self) -> tuple[bool, str]:
        files = [u.file for u in self.units.values() if u.file is not None]
        buffered = [f for f in files if not f.direct]
        return (not buffered, buffered[0].why_buffered if buffered else "")

    # ----------------------------------------------------------- one chunk's step
    def _ours(self, unit: UnitStore, piece: Piece, key: str, current) -> bool:
        return current is not None and unit.at_rest.get((id(piece.tensor), key)) is current

    def read(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """Fill the staging buffer set ``buf`` with the chunk's part of its unit's file (nvme; blocks);
        nothing when none of its state rests in the file yet (first step, a fresh load)."""
        unit, state = chunk.unit, self.optimizer.state
        if any(self._ours(unit, part.piece, k, state.get(part.piece.tensor, {}).get(k))
               for part in chunk.parts for k in self.keys):
            self.io.read(unit.file, chunk.regions(buf, self.set_stride))

    def bring_in(self, chunk: Chunk, buf: torch.Tensor | None) -> list[list[torch.Tensor]]:
        """Point the optimizer's state of the chunk's pieces at working tensors; returns, per param
        group, the tensors to step (the pieces, or sub-parameters of the cut ones)."""
        unit = chunk.unit
        per_group: list[list[torch.Tensor]] = [[] for _ in self.optimizer.param_groups]
        flat = buf.view(torch.float32) if buf is not None else None
        state = self.optimizer.state
        if unit.moves:
            unit.stepping = True
        for part in chunk.parts:
            piece = part.piece
            group = per_group[piece.group if piece.group is not None else 0]
            if not unit.moves:
                group.append(piece.tensor)
                continue
            st = state[piece.tensor]
            if part.whole:
                for key in self.keys:
                    current = st.get(key)
                    if current is None:
                        continue  # first step (or a fresh optimizer after a load): the optimizer initialises it
                    if unit.tier == "nvme":
                        work = chunk.view(flat, self.set_stride, part, key).view(piece.tensor.shape)
                        if not self._ours(unit, piece, key, current):
                            work.copy_(current.reshape(work.shape))
                        if piece.tensor.device.type != "cpu":
                            work = work.to(piece.tensor.device, non_blocking=True)
                    else:  # host tier on an accelerator
                        work = current.to(piece.tensor.device, non_blocking=True)
                    st[key] = work
                group.append(piece.tensor)
                continue
            grad = piece.tensor.grad
            if grad is None:
                continue  # the optimizer would skip the piece: so do its sub-parameters
            sub = piece.tensor.detach().view(-1)[part.x:part.y]
            sub.grad = grad.reshape(-1)[part.x:part.y]
            sub_state = {}
            for key, current in st.items():
                if key in self.keys:
                    work = chunk.view(flat, self.set_stride, part, key)
                    if not self._ours(unit, piece, key, current):
                        work.copy_(current.reshape(-1)[part.x:part.y])
                    if piece.tensor.device.type != "cpu":
                        work = work.to(piece.tensor.device, non_blocking=True)
                    sub_state[key] = work
                else:
                    sub_state[key] = current.clone() if torch.is_tensor(current) else copy.deepcopy(current)
            state[sub] = sub_state
            chunk.subs[id(sub)] = (part, sub)
            group.append(sub)
        return per_group

    def take_out(self, chunk: Chunk, buf: torch.Tensor | None) -> None:
        """After the chunk's step: copy its state into the at-rest place (nvme: into ``buf``, which
        the caller then writes; the state points back at the file in :meth:`settle`)."""
        unit = chunk.unit
        if not unit.moves:
            return
        flat = buf.view(torch.float32) if buf is not None else None
        state = self.optimizer.state
        for part, sub in chunk.subs.values():
            sub_state = state.pop(sub)
            for key in self.keys:
                current = sub_state.get(key)
                if current is not None:
                    home = chunk.view(flat, self.set_stride, part, key)
                    if current.data_ptr() != home.data_ptr():
                        home.copy_(current.reshape(-1))
            chunk.stepped[id(part.piece.tensor)] = [k for k in self.keys if k in sub_state]
            chunk.scalars[id(part.piece.tensor)] = {k: v for k, v in sub_state.items() if k not in self.keys}
        chunk.subs = {}
        for part in chunk.parts:
            if not part.whole:
                continue
            piece = part.piece
            st = state[piece.tensor]
            for key in self.keys:
                current = st.get(key)
                if current is None:
                    continue
                if unit.tier == "nvme":
                    home = chunk.view(flat, self.set_stride, part, key).view(piece.tensor.shape)
                else:
                    home = unit.at_rest.get((id(piece.tensor), key))
                    if home is None:
                        home = torch.empty(current.shape, dtype=current.dtype, device="cpu",
                                           pin_memory=torch.cuda.is_available())
                        unit.at_rest[(id(piece.tensor), key)] = home
                if current.data_ptr() != home.data_ptr():
                    home.copy_(current.reshape(home.shape))
                if unit.tier == "host":
                    dict.__setitem__(st, key, home)
        if unit.tier == "host":
            unit.stepping = False

    def write(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """Write the staging buffer set back to the chunk's part of its unit's file (blocks)."""
        self.io.write(chunk.unit.file, chunk.regions(buf, self.set_stride))

    def settle(self, chunk: Chunk) -> None:
        """The chunk is in its unit's file: its pieces' state points at the file's map again (a cut
        piece once its last chunk is written, with the scalars of that last sub-step)."""
        unit, state = chunk.unit, self.optimizer.state
        for part in chunk.parts:
            piece = part.piece
            st = state[piece.tensor]
            if part.whole:
                keys = [k for k in self.keys if k in st]
            elif part.last and id(piece.tensor) in chunk.stepped:
                keys = chunk.stepped.pop(id(piece.tensor))
                for k, v in chunk.scalars.pop(id(piece.tensor)).items():
                    dict.__setitem__(st, k, v)
            else:
                continue
            for key in keys:
                dict.__setitem__(st, key, unit.at_rest[(id(piece.tensor), key)])
        chunk.stepped.clear()
        chunk.scalars.clear()
        if chunk is unit.chunks[-1]:
            unit.stepping = False

    # ------------------------------------------------------------------ accounting
    def bytes_at_rest(self, tier: str | None = None) -> int:
        """State bytes resting on ``tier`` (default: the offload tier)."""
        tier = tier or self.tier
        return sum(u.state_bytes for u in self.units.values() if u.tier == tier)

    def tiers(self) -> dict[str, str]:
        """Unit name -> the tier its state rests on."""
        return {u.spec.name: u.tier for u in self.units.values()}

    def pool_bytes(self) -> int:
        return sum(b.numel() for b in self.pool)

    def close(self) -> None:
        if self.io is not None:
            self.io.shutdown()
        for u in self.units.values():
            if u.file is not None:
                u.file.close()
