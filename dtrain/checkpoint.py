"""Sharded checkpoints: save, load (into any world size or layout), consolidate.

Format (a directory; nothing is ever unpickled):

* ``rank{r}.safetensors`` — the flat range of every unit that rank ``r`` owns:
  ``u{i}.param`` and ``u{i}.optim.{key}`` for every element-wise optimizer state, plus that
  rank's torch RNG state. Under ``ddp`` only rank 0 writes unit data (one part covers all).
* ``rank{r}.json`` — that rank's python/numpy RNG state and its plugins' JSON state.
* ``plugin.{name}.{key}`` tensors in the rank file — per-rank plugin state (``Plugin.state_dict``:
  tensors here, other values in the rank's JSON); handed back only at the same world size.
* ``extra.safetensors`` — frozen parameters and persistent buffers by name (rank 0).
* ``meta.json`` — written last, after every rank finished: world size, layout, step, the unit
  table (parameter name, shape, flat offset), optimizer hyperparameters and scalar state per
  param group, LR-scheduler state, tied-parameter aliases, and the size and CRC-32C of every
  other file. A directory without it is incomplete.

A save is written into ``<dir>.tmp-<id>`` (every file and the directory fsynced) and renamed
into place once complete; an existing checkpoint at ``dir`` stays loadable until then, and a
failure on any rank is an error on every rank (:func:`save`, docs/layouts.md "Durability").
Loading follows this run's optimizer hyperparameters except those a restored LR scheduler drives
(:func:`_reconcile_optimizer`).

A file that is missing, truncated or fails its CRC-32C is a :class:`CheckpointError` naming the
file and the check. :func:`verify` checks a whole checkpoint collectively (each rank a share of
the files), which is how automatic resume (``Engine._resume``) falls back to the previous
complete checkpoint when the newest is damaged.

Scalar optimizer state (Adam's ``step``) is one value per param group. Every rank steps every
group (under ZeRO a rank owning no element of a group steps an empty placeholder in it), so each
rank's capture holds every group's scalars; a checkpoint lacking a group's scalars is refused at
save and at load. Format 1 checkpoints took the scalars from the elements rank 0 owned and can lack
a group's (the param-group resume bug); they load when complete and are refused, saying so, when
not.

Loading reads tensors *by parameter name* (a name maps to a unit, an offset and the parts that
hold it), so a checkpoint saved at world 4 under ZeRO-3 loads at world 2 or 3, or under another
stage. Optimizer state must be element-wise (Adam, AdamW, SGD momentum, ...) or scalar.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from dtrain.snapshot.coding import checksum

if TYPE_CHECKING:
    from dtrain.engine import Engine

FORMAT = "dtrain-checkpoint/2"
READABLE_FORMATS = ("dtrain-checkpoint/1", FORMAT)


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or does not fit the model."""


# ------------------------------------------------------------------------------- capture
@dataclass
class Flat:
    """A flat tensor to store, described by the pieces that fill it (padding stays zero).

    Capturing pieces instead of copies lets a snapshot write them straight into shared memory
    (one copy) while a disk checkpoint materializes them (:meth:`tensor`).
    """

    dtype: torch.dtype
    numel: int
    pieces: list[tuple[int, torch.Tensor]]  # (element offset, flat source)
    shape: tuple[int, ...] | None = None  # restored shape (None: flat)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Flat":
        flat = tensor.detach().reshape(-1)
        return cls(flat.dtype, flat.numel(), [(0, flat)], tuple(tensor.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def copy_into(self, out: torch.Tensor) -> None:
        """Write the pieces into ``out`` (flat, ``numel`` elements, zero-initialised)."""
        for offset, src in self.pieces:
            out[offset:offset + src.numel()].copy_(src)

    def tensor(self) -> torch.Tensor:
        if len(self.pieces) == 1 and self.pieces[0][0] == 0 and self.pieces[0][1].numel() == self.numel:
            out = self.pieces[0][1].cpu().clone()
        else:
            out = torch.zeros(self.numel, dtype=self.dtype)
            self.copy_into(out)
        return out.view(self.shape) if self.shape is not None else out


@dataclass
class RankState:
    """Everything one rank contributes to a checkpoint or a snapshot of its engine."""

    tensors: dict[str, Flat]
    """``u{i}.param``, ``u{i}.optim.{key}``, ``rng.torch``, ``plugin.{name}.{key}``."""
    info: dict[str, Any]
    """This rank's python/numpy RNG state and its plugins' JSON state."""
    meta: dict[str, Any]
    """What every rank agrees on: world, layout, step, unit table, optimizer, scheduler, aliases."""
    extra: dict[str, torch.Tensor]
    """Frozen parameters and persistent buffers by name (empty unless asked for)."""


@dataclass
class Volatile:
    """The part of a rank's state that the next forward and backward may change, taken as copies:
    RNG states, plugin state, persistent buffers (BatchNorm updates its statistics in forward)."""

    tensors: dict[str, Flat]
    info: dict[str, Any]
    buffers: dict[str, torch.Tensor]


def capture_volatile(engine: "Engine", with_extra: bool = False) -> Volatile:
    """Copies of what changes before the next optimizer step; the rest of :func:`capture` does not."""
    tensors: dict[str, Flat] = {"rng.torch": Flat.of(torch.get_rng_state())}
    if engine.device.type == "cuda":
        tensors["rng.cuda"] = Flat.of(torch.cuda.get_rng_state(engine.device))
    plugin_json: dict[str, dict[str, Any]] = {}
    for plugin in engine.plugins:
        if plugin is engine.layout:
            continue
        for key, value in plugin.state_dict().items():
            if torch.is_tensor(value):
                tensors[f"plugin.{plugin.name}.{key}"] = Flat.of(value)
            else:
                plugin_json.setdefault(plugin.name, {})[key] = _jsonable(value)
    info = {"python": random.getstate(), "numpy": np.random.get_state(), "plugins": plugin_json}
    buffers = {}
    if with_extra:
        buffers = {f"buffer.{n}": engine.model.get_buffer(n).detach().clone() for n in _static_meta(engine)[2]}
    return Volatile(tensors, info, buffers)


def capture(engine: "Engine", all_units: bool = False, with_extra: bool = False,
            volatile: Volatile | None = None) -> RankState:
    """This rank's state without copying parameter or optimizer data.

    Under ZeRO every rank owns a range of each unit; under ``ddp`` rank 0 alone stores unit data
    unless ``all_units`` (a snapshot: every rank must be able to restore from its own copy).
    ``volatile`` (taken earlier with :func:`capture_volatile`, default: now) supplies the RNG,
    plugin and buffer state. Everything else read here (parameters, optimizer state and scalars,
    LR scheduler, step) changes only in the next optimizer step, so a snapshot captures
    ``volatile`` at the end of a step and the rest in a background thread while the next step's
    forward and backward run (:mod:`dtrain.plugins.snapshot`). ``info`` and ``meta`` are
    JSON-encoded when written (:func:`to_json`).
    """
    volatile = volatile if volatile is not None else capture_volatile(engine, with_extra)
    layout, comm = engine.layout, engine.comm
    masters = layout.shards("master")
    level, parts, _ = layout.placement("master")
    writes_units = all_units or all(m.primary for m in masters)
    tensors = dict(volatile.tensors)
    elementwise = _elementwise_keys(layout.optimizer)
    if writes_units:
        for m in masters:
            tensors[f"u{m.unit.index}.param"] = _flat(m)
        for key in sorted(elementwise):
            for shard in layout.shards(f"optim.{key}"):
                tensors[f"u{shard.unit.index}.optim.{key}"] = _flat(shard)
    units, aliases, _, _ = _static_meta(engine)
    holders = layout.part_holders("master")
    meta = {
        "format": FORMAT, "world_size": comm.topology.shape.world_size, "parts": parts,
        "layout": layout.name, "step": engine.step, "units": units,
        "shards": {kind: {"level": level, "parts": parts, "holders": holders} for kind in ("param", "optim")},
        "optimizer": {"class": type(layout.optimizer).__name__,
                      "param_groups": [_jsonable({k: v for k, v in g.items() if k != "params"})
                                       for g in layout.optimizer.param_groups],
                      "scalar_state": _scalar_state(layout.optimizer, elementwise)},
        "scheduler": _jsonable(engine.scheduler.state_dict()) if engine.scheduler else None,
        "aliases": aliases,
    }
    extra: dict[str, torch.Tensor] = {}
    if with_extra:
        extra = dict(volatile.buffers)
        extra.update({f"frozen.{n}": engine.model.get_parameter(n).detach() for n in _static_meta(engine)[3]})
    return RankState(tensors, volatile.info, meta, extra)


def _elementwise_keys(optimizer: torch.optim.Optimizer) -> set[str]:
    """Optimizer state keys holding one value per parameter element (Adam's ``exp_avg``).

    Decided over the whole optimizer, not per tensor: a 0-dim parameter's ``exp_avg`` is 0-dim
    too, but it is element-wise like every other parameter's."""
    return {key for st in optimizer.state.values() for key, value in st.items()
            if torch.is_tensor(value) and value.dim() > 0}


def _flat(shard: Any) -> Flat:
    """A shard's range [lo, hi) as a :class:`Flat` of its pieces (gaps stay zero)."""
    dtype = shard.pieces[0].tensor.dtype if shard.pieces else torch.float32
    flat = Flat(dtype, shard.hi - shard.lo, [])
    for piece in shard.pieces:
        if piece.tensor.numel() != piece.hi - piece.lo:
            raise CheckpointError(
                f"{shard.kind} of unit {shard.unit.name} has shape {tuple(piece.tensor.shape)}, not "
                f"element-wise; dtrain checkpoints support element-wise optimizers (Adam, AdamW, SGD, ...)")
        flat.pieces.append((piece.lo - shard.lo, piece.flat()))
    return flat


def _scalar_state(optimizer: torch.optim.Optimizer, elementwise: set[str]) -> list[dict[str, Any]]:
    """Each param group's scalar state, read from every parameter of the group (placeholders
    included), so a group is covered whichever rank owns its elements."""
    groups: list[dict[str, Any]] = []
    for gi, group in enumerate(optimizer.param_groups):
        found: dict[str, Any] = {}
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key in elementwise:
                    continue
                entry = {"value": float(value), "tensor": torch.is_tensor(value),
                         "dtype": str(value.dtype).removeprefix("torch.") if torch.is_tensor(value) else None}
                if found.setdefault(key, entry) != entry:
                    raise CheckpointError(
                        f"optimizer state {key!r} differs between parameters of param group {gi} "
                        f"({found[key]['value']} vs {entry['value']}); dtrain checkpoints keep one "
                        f"scalar per param group")
        groups.append(found)
    _check_scalar_state(groups, "this run's optimizer")
    return groups


def _check_scalar_state(groups: list[dict[str, Any]], where: str, format_: str = FORMAT) -> None:
    """Every param group has the same scalar state keys: a group without them would crash the
    optimizer's next step (``KeyError: 'step'``) or silently restart its bias correction."""
    keys = [sorted(g) for g in groups]
    reference = max(keys, key=len)
    bad = [gi for gi, k in enumerate(keys) if k != reference]
    if not bad:
        return
    good = keys.index(reference)
    why = (" It was written by a dtrain before the param-group fix (format dtrain-checkpoint/1), which "
           "saved only the groups rank 0 owned elements of; its parameters are intact: "
           "dtrain.consolidate() returns them for a fresh start of the optimizer."
           if format_ == READABLE_FORMATS[0] else "")
    raise CheckpointError(
        f"{where} lacks the optimizer's scalar state {reference} for param group(s) {bad} "
        f"(group {good} has it){'; refusing to resume from it.' if why else ''}{why}")


# ------------------------------------------------------------------------------------ save
CHECKPOINT_FILE = re.compile(r"(rank\d+\.(safetensors|json)|extra\.safetensors|meta\.json)(\.tmp)?")
"""Names a checkpoint directory may hold; ``save`` replaces only a directory of nothing else."""


def save(engine: "Engine", directory: str | os.PathLike) -> None:
    """Write a checkpoint of ``engine`` to ``directory`` (collective), durably and atomically.

    Every rank writes and fsyncs its files into ``<directory>.tmp-<id>`` (``id`` picked by rank 0
    and sent with the first collective); rank 0 writes ``meta.json`` there once every rank
    succeeded, fsyncs it and the directory, and renames the directory into place. An existing
    checkpoint at ``directory`` is first renamed to ``<directory>.old-<id>`` and deleted only
    after the new one is in place, so a crash at any moment leaves a complete checkpoint at
    ``directory``, ``<directory>.old-<id>`` or ``<directory>.tmp-<id>`` (automatic resume looks at
    all three: :func:`dtrain.engine.checkpoints_newest_first`). A failure on any rank (a full disk)
    removes the temporary directory and raises :class:`CheckpointError` on every rank at the next
    collective of the save, naming the rank and its error; the previous checkpoint is untouched.
    """
    comm = engine.comm
    rank = comm.rank
    path = Path(directory)
    setup = None
    if rank == 0:
        try:
            setup = {"id": f"{os.getpid():x}{secrets.token_hex(3)}", "error": _replaceable(path)}
        except OSError as exc:
            setup = {"id": "", "error": f"{path}: {exc}"}
    setup = comm.all_gather_json(setup)[0]
    if setup["error"]:
        raise CheckpointError(setup["error"])
    tmp = path.with_name(f"{path.name}.tmp-{setup['id']}")
    files: dict[str, dict[str, int]] = {}
    error = None
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        state = capture(engine, with_extra=rank == 0)
        files[f"rank{rank}.safetensors"] = _atomic_save_flats(state.tensors, tmp / f"rank{rank}.safetensors")
        files[f"rank{rank}.json"] = _atomic_json(state.info, tmp / f"rank{rank}.json")
        if rank == 0:
            extra = {k: v.cpu().contiguous() for k, v in state.extra.items()}
            files["extra.safetensors"] = _atomic_save(extra or {"_empty": torch.zeros(0)}, tmp / "extra.safetensors")
        _fsync_dir(tmp)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it, whatever it was
        error = f"rank {rank}: {type(exc).__name__}: {exc} (writing into {tmp})"
    reports = comm.all_gather_json({"files": files, "error": error})
    failed = [r["error"] for r in reports if r["error"]]
    outcome = None
    if rank == 0:
        if not failed:
            try:
                written = {name: check for r in reports for name, check in r["files"].items()}
                _atomic_json({**state.meta, "files": written}, tmp / "meta.json")
                _fsync_dir(tmp)
                _move_into_place(tmp, path, setup["id"])
            except Exception as exc:  # noqa: BLE001
                outcome = f"rank 0: {type(exc).__name__}: {exc}"
        if failed or outcome:
            shutil.rmtree(tmp, ignore_errors=True)
    outcome = comm.all_gather_json(outcome)[0]
    if failed or outcome:
        old = " the previous checkpoint there is unchanged;" if (path / "meta.json").is_file() else ""
        raise CheckpointError(f"saving checkpoint {path} failed on {'; '.join(failed or [outcome])};{old} "
                              f"the partial files were removed")


def _replaceable(path: Path) -> str | None:
    """Why ``save`` may not put a checkpoint at ``path`` (None: it may): anything there besides a
    checkpoint's files (or an earlier save's leftovers) would be deleted with the old checkpoint."""
    if not path.exists():
        return None
    if not path.is_dir():
        return f"cannot save a checkpoint to {path}: it exists and is not a directory"
    foreign = sorted(p.name for p in path.iterdir() if not CHECKPOINT_FILE.fullmatch(p.name))
    if foreign:
        return (f"cannot save a checkpoint to {path}: it holds files that are not a dtrain checkpoint's "
                f"({', '.join(foreign[:3])}); save into a new or empty directory")
    return None


def _move_into_place(tmp: Path, path: Path, save_id: str) -> None:
    """Rename the complete ``tmp`` to ``path``; an existing checkpoint there goes aside first and
    is deleted last, and earlier saves' leftovers of ``path`` with it."""
    aside = path.with_name(f"{path.name}.old-{save_id}")
    if path.exists():
        os.rename(path, aside)
        _fsync_dir(path.parent)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    for stale in save_leftovers(path):
        shutil.rmtree(stale, ignore_errors=True)


def save_leftovers(path: Path) -> list[Path]:
    """What interrupted saves of ``path`` left beside it: the new checkpoint not yet renamed
    (``<path>.tmp-<id>``) and the old one moved aside (``<path>.old-<id>``)."""
    name = glob.escape(path.name)
    return [*path.parent.glob(f"{name}.tmp-*"), *path.parent.glob(f"{name}.old-*")]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ read
class StateReader:
    """Tensors of a saved state by parameter name, whatever layout and world size wrote it.

    Subclasses say where the parts live: :class:`CheckpointReader` (a directory) or a snapshot
    reader (one rank's in-memory blob).
    """

    meta: dict[str, Any]
    where_saved: str
    sample_rank: int = 0
    """A rank whose part this reader holds (lists the stored optimizer keys)."""

    def _index(self) -> None:
        if self.meta.get("format") not in READABLE_FORMATS:
            raise CheckpointError(f"{self.where_saved}: unknown format {self.meta.get('format')!r}, "
                                  f"expected one of {list(READABLE_FORMATS)}")
        self.where = {slot[0]: (ui, slot[1], slot[2]) for ui, u in enumerate(self.meta["units"])
                      for slot in u["slots"]}

    def part(self, rank: int) -> Any:
        """Rank ``rank``'s tensors: ``keys()``, ``get_tensor(key)`` and ``get_slice(key)[a:b]``."""
        raise NotImplementedError

    def rank_info(self, rank: int) -> dict[str, Any]:
        raise NotImplementedError

    def extra(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def names(self) -> list[str]:
        return list(self.where)

    def optim_keys(self) -> list[str]:
        return sorted({k.split(".optim.", 1)[1] for k in self.part(self.sample_rank).keys()
                       if ".optim." in k and not k.startswith("plugin.")})

    def read(self, name: str, kind: str = "param") -> torch.Tensor:
        """The full tensor of parameter ``name``: ``kind`` is "param" or an optimizer state key."""
        if name not in self.where:
            raise CheckpointError(f"parameter {name!r} is not in {self.where_saved}")
        ui, shape, offset = self.where[name]
        numel = int(np.prod(shape)) if shape else 1
        return self._read_range(ui, kind, offset, offset + numel).view(shape)

    def read_flat(self, name: str, kind: str, a: int, b: int) -> torch.Tensor:
        """Elements [a, b) of parameter ``name`` flattened (touches only the parts holding them)."""
        ui, _, offset = self.where[name]
        return self._read_range(ui, kind, offset + a, offset + b)

    def placement(self, kind: str) -> tuple[int, list[int]]:
        """(parts, holders): the kind ("param" or an optimizer key) was split into ``parts``
        and part i is stored in the part (rank file) ``holders[i]``."""
        placed = self.meta.get("shards", {}).get("param" if kind == "param" else "optim")
        if placed is None:  # written before placements were recorded: part i in rank file i
            return self.meta["parts"], list(range(self.meta["parts"]))
        return placed["parts"], placed["holders"]

    def _read_range(self, ui: int, kind: str, a: int, b: int) -> torch.Tensor:
        parts, holders = self.placement(kind)
        size = self.meta["units"][ui]["padded"] // parts
        key = f"u{ui}.param" if kind == "param" else f"u{ui}.optim.{kind}"
        out = []
        for i in range(a // size, (b - 1) // size + 1):
            lo = i * size
            sl = self.part(holders[i]).get_slice(key)
            out.append(sl[max(a, lo) - lo:min(b, lo + size) - lo])
        return torch.cat(out) if len(out) > 1 else out[0]


class CheckpointReader(StateReader):
    """A checkpoint directory written by :func:`save`; each file is checked against the size and
    CRC-32C that ``meta.json`` records for it the first time it is read."""

    def __init__(self, directory: str | os.PathLike, verified: bool = False) -> None:
        self.path = Path(directory)
        self.where_saved = f"checkpoint {self.path}"
        self.verified = verified
        """Every file already passed :func:`verify`: skip the per-file checks."""
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{self.path} is not a complete dtrain checkpoint (no meta.json); "
                                  f"it was not written or its save did not finish")
        self.meta = _parse_json(meta_path)
        try:
            self._index()
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{meta_path}: not a dtrain checkpoint's metadata "
                                  f"({type(exc).__name__}: {exc}); the file is corrupt") from None
        self._files: dict[int, Any] = {}
        self._checked: set[str] = set()

    def files(self) -> list[str]:
        """Every file the checkpoint consists of besides ``meta.json``."""
        recorded = self.meta.get("files")
        if recorded is not None:
            return sorted(recorded)
        ranks = range(self.meta["world_size"])  # format 1 recorded no list
        return [f"rank{r}{ext}" for r in ranks for ext in (".safetensors", ".json")] + ["extra.safetensors"]

    def check(self, name: str) -> Path:
        """``name``'s path once it exists and matches its recorded size and CRC-32C."""
        f = self.path / name
        if name in self._checked:
            return f
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
        expected = self.meta.get("files", {}).get(name)
        if self.verified:
            pass
        elif expected is not None:
            data = f.read_bytes()
            if len(data) != expected["bytes"]:
                raise CheckpointError(f"{f}: size check failed: {len(data)} bytes, {expected['bytes']} "
                                      f"written; the file is truncated or was overwritten")
            if checksum(data) != expected["crc32c"]:
                raise CheckpointError(f"{f}: CRC-32C check failed; the file is corrupt")
        elif name.endswith(".safetensors"):
            _open_safetensors(f).__exit__(None, None, None)  # format 1: the header must parse
        self._checked.add(name)
        return f

    def part(self, rank: int) -> Any:
        if rank not in self._files:
            self._files[rank] = _open_safetensors(self.check(f"rank{rank}.safetensors"))
        return self._files[rank]

    def rank_info(self, rank: int) -> dict[str, Any]:
        return _parse_json(self.check(f"rank{rank}.json"))

    def extra(self) -> dict[str, torch.Tensor]:
        with _open_safetensors(self.check("extra.safetensors")) as f:
            return {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}


def verify(directory: str | os.PathLike, comm: Any) -> str | None:
    """Collective: check every file of the checkpoint (each rank a share); the first problem
    found, identical on every rank, or None when the checkpoint is intact."""
    problem = None
    try:
        reader = CheckpointReader(directory)
        for i, name in enumerate(reader.files()):
            if i % comm.topology.shape.world_size == comm.rank:
                reader.check(name)
    except CheckpointError as exc:
        problem = str(exc)
    return next((p for p in comm.all_gather_json(problem) if p), None)


def _parse_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is truncated or corrupt") from None


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); the file is "
                              f"truncated or corrupt") from None


# ------------------------------------------------------------------------------------ load
def load(engine: "Engine", source: "str | os.PathLike | StateReader", verified: bool = False) -> None:
    """Restore ``engine`` from a checkpoint directory or any :class:`StateReader` (collective).

    A directory is first checked whole (:func:`verify`, unless ``verified``), so a damaged file
    is an error before anything is changed, whichever ranks would have read it."""
    if not isinstance(source, StateReader) and not verified:
        problem = verify(source, engine.comm)
        if problem is not None:
            raise CheckpointError(problem)
    reader = source if isinstance(source, StateReader) else CheckpointReader(source, verified=verified)
    layout, meta = engine.layout, reader.meta
    _check_model(reader, engine)
    restores_scheduler = engine.scheduler is not None and meta["scheduler"] is not None
    same_class = _reconcile_optimizer(engine, reader, restores_scheduler)
    keys = reader.optim_keys() if same_class else []
    scalars = meta["optimizer"]["scalar_state"]
    if not same_class:
        scalars = [{} for _ in layout.optimizer.param_groups]
    elif len(scalars) != len(layout.optimizer.param_groups):
        raise CheckpointError(f"{reader.where_saved} has {len(scalars)} optimizer param groups, "
                              f"the optimizer has {len(layout.optimizer.param_groups)}")
    _check_scalar_state(scalars, reader.where_saved, meta["format"])
    with torch.no_grad():
        for master in layout.shards("master"):
            for piece in master.pieces:
                piece.flat().copy_(_assemble(reader, master.unit, piece.lo, piece.hi, "param"))
        layout.publish()
        owned = {id(piece.tensor): (unit, piece) for unit, piece in layout.optimizer_pieces()}
        state = layout.optimizer.state
        for gi, group in enumerate(layout.optimizer.param_groups):
            for tensor in group["params"]:
                st = state[tensor]
                unit, piece = owned.get(id(tensor), (None, None))
                for key in keys:  # a placeholder (owns no element of its group) gets empty state
                    st[key] = (_assemble(reader, unit, piece.lo, piece.hi, key).view_as(tensor).to(tensor.device)
                               if piece is not None else torch.zeros(0, device=tensor.device))
                for key, sc in scalars[gi].items():
                    st[key] = torch.tensor(sc["value"], dtype=getattr(torch, sc["dtype"])) if sc["tensor"] else sc["value"]
        extra = reader.extra()
        buffers = dict(_persistent_buffers(engine.model))
        params = dict(engine.model.named_parameters())
        for key, value in extra.items():
            kind, name = key.split(".", 1)
            target = buffers.get(name) if kind == "buffer" else params.get(name)
            if target is not None:
                target.copy_(value)
    if engine.scheduler is not None and meta["scheduler"] is not None:
        engine.scheduler.load_state_dict(meta["scheduler"])
    engine.step = meta["step"]
    rank = layout.comm.rank
    if meta["world_size"] == layout.comm.topology.shape.world_size:  # RNG streams are per rank
        part = reader.part(rank)
        torch.set_rng_state(part.get_tensor("rng.torch"))
        if "rng.cuda" in part.keys() and engine.device.type == "cuda":
            torch.cuda.set_rng_state(part.get_tensor("rng.cuda"), engine.device)
        info = reader.rank_info(rank)
        random.setstate(_tuples(info["python"]))
        np.random.set_state(tuple(_np_state(info["numpy"])))
        _load_plugin_states(engine, info.get("plugins", {}), part)
    else:  # another world size: only state that is the same on every rank carries over (rank 0's)
        _load_plugin_states(engine, reader.rank_info(0).get("plugins", {}), reader.part(0), only_global=True)
    layout.comm.barrier()


def _scheduler_keys(optimizer: torch.optim.Optimizer, saved_scheduler: dict[str, Any]) -> set[str]:
    """Param-group keys an LR scheduler drives: ``lr``, the keys schedulers add (``initial_lr``,
    OneCycleLR's ``max_lr``/``min_lr``/``base_momentum``/``max_momentum``: not the optimizer's
    own hyperparameters), and ``momentum``/``betas`` under a ``cycle_momentum`` schedule."""
    group_keys = {k for g in optimizer.param_groups for k in g if k != "params"}
    driven = {"lr"} | (group_keys - set(optimizer.defaults))
    if saved_scheduler.get("cycle_momentum"):
        driven |= {"momentum", "betas"}
    return driven


def _reconcile_optimizer(engine: "Engine", reader: "StateReader", restores_scheduler: bool) -> bool:
    """Decide the param groups' hyperparameters of a resumed run; True when the saved optimizer
    state fits this optimizer (same class).

    This run's optimizer factory wins (a changed ``weight_decay`` takes effect), except for what a
    restored LR scheduler drives (:func:`_scheduler_keys`), which must continue the saved schedule
    and so comes from the checkpoint. Another optimizer class starts with fresh optimizer state.
    Any difference is one line on rank 0, or with ``checkpoint.strict`` a :class:`CheckpointError`
    (on every rank: they all see the same difference)."""
    optimizer, saved = engine.layout.optimizer, reader.meta["optimizer"]
    mine = type(optimizer).__name__
    differences = []
    same_class = saved["class"] == mine
    if not same_class:
        differences.append(f"optimizer {saved['class']} -> {mine} (its state starts fresh)")
    driven = _scheduler_keys(optimizer, reader.meta["scheduler"]) if restores_scheduler else set()
    restored: list[tuple[dict[str, Any], str, Any]] = []
    for gi, (group, before) in enumerate(zip(optimizer.param_groups, saved["param_groups"])):
        for key, value in before.items():
            if key in driven:
                if key == "initial_lr" and _jsonable(group.get(key)) != value:
                    differences.append(f"group {gi} initial_lr {value} -> {_jsonable(group.get(key))} (the "
                                       f"restored LR scheduler continues the saved schedule)")
                restored.append((group, key, tuple(value) if isinstance(group.get(key), tuple) else value))
            elif same_class and key in group and _jsonable(group[key]) != value:
                differences.append(f"group {gi} {key} {value} -> {_jsonable(group[key])}")
    if differences:
        shown = ", ".join(differences[:6]) + (f" and {len(differences) - 6} more" if len(differences) > 6 else "")
        if engine.config.checkpoint.strict:
            raise CheckpointError(f"{reader.where_saved} was saved with other optimizer settings ({shown}); "
                                  f"checkpoint.strict = true refuses to resume from it: restore the saved "
                                  f"settings or set checkpoint.strict = false to follow this run's")
        if engine.comm.rank == 0:
            print(f"dtrain: {reader.where_saved} was saved with other optimizer settings ({shown}); "
                  f"following this run's optimizer", file=sys.stderr)
    for group, key, value in restored:
        group[key] = value
    return same_class


def _load_plugin_states(engine: "Engine", saved: dict[str, dict[str, Any]], part: Any,
                        only_global: bool = False) -> None:
    """Hand each plugin its state back: all of it at the same world size (it is per rank), only
    that of plugins whose state is global (``Plugin.global_state``, e.g. the data position) at
    another."""
    keys = list(part.keys())
    for plugin in engine.plugins:
        if plugin is engine.layout or (only_global and not plugin.global_state):
            continue
        prefix = f"plugin.{plugin.name}."
        state = dict(saved.get(plugin.name, {}))
        state.update({k[len(prefix):]: part.get_tensor(k) for k in keys if k.startswith(prefix)})
        if state:
            plugin.load_state_dict(state)


def _assemble(reader: StateReader, unit: Any, lo: int, hi: int, kind: str) -> torch.Tensor:
    """Flat range [lo, hi) of ``unit`` (a :class:`~dtrain.partition.UnitSpec` of this run's
    layout) rebuilt from the saved names; padding is zero."""
    out = torch.zeros(hi - lo, dtype=torch.float32)
    for s in unit.slots:
        a, b = max(s.offset, lo), min(s.offset + s.numel, hi)
        if a < b:
            out[a - lo:b - lo] = reader.read_flat(s.name, kind, a - s.offset, b - s.offset)
    return out


def _check_model(reader: StateReader, engine: "Engine") -> None:
    saved = {n: tuple(shape) for n, (_, shape, _) in reader.where.items()}
    have = {s.name: tuple(s.shape) for u in engine.layout.unit_specs() for s in u.slots}
    if saved.keys() != have.keys():
        diff = sorted(saved.keys() ^ have.keys())
        raise CheckpointError(f"{reader.where_saved} was saved from a different model: "
                              f"parameter sets differ at {diff[:3]}")
    bad = [n for n in saved if saved[n] != have[n]]
    if bad:
        raise CheckpointError(f"{reader.where_saved}: parameter {bad[0]!r} has shape "
                              f"{saved[bad[0]]}, the model has {have[bad[0]]}")


# ------------------------------------------------------------------------------ consolidate
def consolidate(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Plain fp32 ``state_dict`` (params, tied aliases, buffers, frozen params) of a checkpoint."""
    reader = CheckpointReader(directory)
    state = {name: reader.read(name).clone() for name in reader.names()}
    for key, value in reader.extra().items():
        state[key.split(".", 1)[1]] = value
    for alias, name in reader.meta["aliases"].items():
        state[alias] = state[name]
    return state


# ----------------------------------------------------------------------------------- helpers
def _static_meta(engine: "Engine") -> tuple[list[dict[str, Any]], dict[str, str], list[str], list[str]]:
    """Unit table, tied-parameter aliases, persistent buffer names and frozen parameter names:
    fixed once the model is wrapped, so built once."""
    cached = getattr(engine.layout, "_checkpoint_static", None)
    if cached is None:
        model = engine.model
        units = [{"padded": u.padded, "slots": [[s.name, list(s.shape), s.offset, s.group] for s in u.slots]}
                 for u in engine.layout.unit_specs()]
        buffers = [n for n, _ in _persistent_buffers(model)]
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        cached = engine.layout._checkpoint_static = (units, _aliases(model), buffers, frozen)
    return cached


def to_json(obj: Any) -> str:
    """JSON text of captured metadata (numpy arrays and tensors become lists, tuples lists)."""
    return json.dumps(obj, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.integer, np.floating)) or torch.is_tensor(obj):
        return obj.tolist()
    raise CheckpointError(f"cannot store {type(obj).__name__} in a checkpoint (JSON only)")


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _persistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    keys = set(model.state_dict().keys())
    return [(n, b) for n, b in model.named_buffers() if n in keys]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, int]:
    return _atomic_write(safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}), path)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _atomic_save_flats(flats: dict[str, Flat], path: Path) -> dict[str, int]:
    """A safetensors file of ``flats`` written piece by piece (fsynced, via a rename), so no more
    than one piece is copied at a time: state that rests on the offload tier (a memory map of its
    file) goes from its descriptor to the checkpoint without a full copy in memory. Its size and
    CRC-32C, for ``meta.json``."""
    import struct

    names = sorted(flats)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        f = flats[name]
        shape = list(f.shape) if f.shape is not None else [f.numel]
        header[name] = {"dtype": _SAFETENSORS_DTYPES[f.dtype], "shape": shape,
                        "data_offsets": [offset, offset + f.nbytes]}
        offset += f.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with _DurableFile(path) as out:
        out.put(struct.pack("<Q", len(blob)))
        out.put(blob)
        for name in names:
            f = flats[name]
            at = 0  # elements written so far
            for start, src in sorted(f.pieces, key=lambda p: p[0]):
                if start > at:
                    out.put(bytes((start - at) * f.dtype.itemsize))
                piece = src.detach().reshape(-1).cpu().contiguous()
                if piece.numel():
                    out.put(memoryview(piece.view(torch.uint8).numpy()))
                at = start + piece.numel()
            if f.numel > at:
                out.put(bytes((f.numel - at) * f.dtype.itemsize))
    return out.record


def _atomic_json(obj: Any, path: Path) -> dict[str, int]:
    return _atomic_write(to_json(obj).encode(), path)


def _atomic_write(data: bytes, path: Path) -> dict[str, int]:
    """Write ``data`` to ``path`` durably (fsynced, via a rename); its size and CRC-32C, for ``meta.json``."""
    with _DurableFile(path) as out:
        out.put(data)
    return out.record


class _DurableFile:
    """``path`` written through ``<path>.tmp``: ``put`` appends and keeps the running size and
    CRC-32C; a clean exit fsyncs and renames into place, a failure removes the temporary file."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_suffix(path.suffix + ".tmp")
        self.crc, self.size = 0, 0

    def __enter__(self) -> "_DurableFile":
        self.file = open(self.tmp, "wb")
        return self

    def put(self, data: Any) -> None:
        self.file.write(data)
        self.crc = checksum(data, self.crc)
        self.size += memoryview(data).nbytes

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)

    @property
    def record(self) -> dict[str, int]:
        return {"bytes": self.size, "crc32c": self.crc}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return None  # e.g. LambdaLR lambdas: not state, recreated by the factory
    raise CheckpointError(f"cannot store {type(obj).__name__} in a checkpoint (JSON only)")


def _tuples(obj: Any) -> Any:
    return tuple(_tuples(v) for v in obj) if isinstance(obj, list) else obj


def _np_state(state: list[Any]) -> list[Any]:
    state[1] = np.array(state[1], dtype=np.uint32)
    return state
