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

A state tensor that is not the at-rest one (first step: absent; after ``load``: a fresh tensor
the checkpoint assembled) is *adopted*: copied into the staging buffers and written out, so a
load or a reshard needs nothing from the tier. State files are scratch: a checkpoint never points
at them, so a failed write can always be recovered from the last checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dtrain.offload.aio import DirectFile, IOPool, aligned_buffer, round_up
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


class TierStore:
    """Every unit's :class:`UnitStore`, the staging buffer pool and the I/O threads."""

    def __init__(self, layout, tier: str, keys: list[str], directory: Path | None, io_threads: int,
                 buffer_sets: int, unit_tiers: dict[int, str] | None = None) -> None:
        """``tier``: the offload tier; ``unit_tiers``: unit index -> tier where it differs (resident units)."""
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
        nvme = [u for u in self.units.values() if u.tier == "nvme"]
        self.io = IOPool(io_threads) if nvme else None
        self.directory = directory
        self.buffer_sets = buffer_sets if nvme else 0
        self.set_bytes = max((u.stride * len(keys) for u in nvme), default=0)
        self.pool: list[torch.Tensor] = []
        if nvme:
            assert directory is not None
            for u in nvme:
                u.file = DirectFile(str(directory / f"u{u.spec.index}.state"), u.stride * len(keys))
                n = u.stride * len(keys) // F32
                mapped = torch.from_numpy(np.memmap(u.file.path, dtype=np.float32, mode="r+", shape=(n,)))
                for piece in u.pieces:
                    for key in keys:
                        u.at_rest[(id(piece.tensor), key)] = u.views(mapped, piece, key)
            self.pool = [aligned_buffer(self.set_bytes) for _ in range(self.buffer_sets)]
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

    # ------------------------------------------------------------ one unit's step
    def owns(self, unit: UnitStore) -> bool:
        """Whether any of the unit's state is at rest in the tier (else there is nothing to read)."""
        state = self.optimizer.state
        return any(state.get(p.tensor, {}).get(k) is unit.at_rest.get((id(p.tensor), k))
                   and (id(p.tensor), k) in unit.at_rest for p in unit.pieces for k in self.keys)

    def read(self, unit: UnitStore, buf: torch.Tensor) -> None:
        """Fill the staging buffer set ``buf`` with the unit's file (nvme; blocks)."""
        if self.owns(unit):
            self.io.read(unit.file, buf[:unit.stride * len(self.keys)])

    def bring_in(self, unit: UnitStore, buf: torch.Tensor | None) -> None:
        """Point the optimizer's state of the unit's pieces at working tensors before its step."""
        if not unit.moves:
            return
        unit.stepping = True
        flat = buf.view(torch.float32) if buf is not None else None
        state = self.optimizer.state
        for piece in unit.pieces:
            st = state[piece.tensor]
            for key in self.keys:
                current = st.get(key)
                if current is None:
                    continue  # first step (or a fresh optimizer after a load): the optimizer initialises it
                ours = unit.at_rest.get((id(piece.tensor), key)) is current
                if unit.tier == "nvme":
                    work = unit.views(flat, piece, key)
                    if not ours:
                        work.copy_(current.reshape(work.shape))
                    if piece.tensor.device.type != "cpu":
                        work = work.to(piece.tensor.device, non_blocking=True)
                    st[key] = work
                else:  # host tier on an accelerator
                    st[key] = current.to(piece.tensor.device, non_blocking=True)

    def take_out(self, unit: UnitStore, buf: torch.Tensor | None) -> None:
        """After the unit's step: copy the state into its at-rest place (nvme: into ``buf``, which
        the caller then writes; the at-rest views are set by :meth:`settle` once it is written)."""
        if not unit.moves:
            return
        flat = buf.view(torch.float32) if buf is not None else None
        state = self.optimizer.state
        for piece in unit.pieces:
            st = state[piece.tensor]
            for key in self.keys:
                current = st[key]
                if unit.tier == "nvme":
                    home = unit.views(flat, piece, key)
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

    def write(self, unit: UnitStore, buf: torch.Tensor) -> None:
        """Write the staging buffer set back to the unit's file (blocks)."""
        self.io.write(unit.file, buf[:unit.stride * len(self.keys)])

    def settle(self, unit: UnitStore) -> None:
        """The unit's file holds its state: the optimizer's state points at the file's map again."""
        state = self.optimizer.state
        for piece in unit.pieces:
            for key in self.keys:
                dict.__setitem__(state[piece.tensor], key, unit.at_rest[(id(piece.tensor), key)])
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
