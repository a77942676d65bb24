"""Data loading for dtrain: a resumable distributed loader and variable-length token batches.

``dtrain.data.loader(dataset, batch_size, engine=engine)`` is a ``torch.utils.data.DataLoader``
whose batch sampler deals out *global* batches: every step the job reads ``batch_size x world``
samples of one seeded permutation of the dataset, and rank ``r`` gets the contiguous slice
``[r * batch_size, (r + 1) * batch_size)`` of that global batch. ``batch_size`` is per rank and
per ``train_step`` (what one rank passes to ``engine.train_step``); with ``train.grad_accum = A``
the engine splits it into ``A`` micro-batches, so DeepSpeed's ``train_micro_batch_size_per_gpu``
is ``batch_size / A`` and its ``train_batch_size`` is ``batch_size x world``.

Position. The loader's position is *global*: (epoch, samples of the epoch's permutation consumed
by the whole job). The permutation depends only on (seed, epoch, len(dataset)), never on the
world size, so the position means the same thing at any world size. The position counts the
batches the loader has *handed out* (not those its workers prefetched): after ``train_step`` on
the k-th batch it is k global batches further, which is what a checkpoint or a snapshot taken at
the end of that step records. Iterating the loader again continues from the position (it does not
restart the epoch); an epoch ends after its last batch, and the position moves to the next epoch.

Checkpoints and snapshots. A loader attached to an engine (``engine=`` here, or
``engine.attach(loader)``) lives in the engine's ``data`` plugin slot (:class:`DataSlot`), whose
plugin state is saved with every checkpoint and snapshot. A loader attached after the engine
resumed gets the restored position at attach time. Supported: exact resume at the same world
size (same batches, bit-exact ``param_sha256``). At another world size the position carries over
when the checkpoint hands plugin state across world sizes (``DataSlot.global_state``); keeping
the global batch (``batch_size x world``) the same then gives exactly the same global batches,
while a different global batch continues the same sample stream in differently sized batches.

Why not torchdata's ``StatefulDataLoader``: its state is per rank (the sampler iterator's state,
per-worker states and a count of yielded batches), so it cannot move to another world size, and
with a sampler that restarts in O(1) from a global sample offset it adds nothing we need (the
handed-out count is kept here in a few lines). Its per-worker state matters for stateful
``IterableDataset`` pipelines, which this loader does not shard; use map-style datasets.

RNG. The permutation of epoch ``e`` is ``torch.randperm(n)`` under ``torch.Generator`` seeded
``seed + e`` (``seed`` defaults to ``train.seed``). The loader never draws from the global torch
RNG (worker seeds come from a generator seeded by (seed, epoch, position, rank)), so creating
an iterator never shifts the model's dropout stream.

``drop_last`` (default True): the tail of an epoch smaller than one global batch is dropped, so
every step has the full global batch, splits evenly into ``train.grad_accum`` micro-batches and
is the same at any world size. With ``drop_last=False`` the last global batch holds the tail,
padded by repeating the permutation's first samples to a multiple of the world size; every rank
then gets ``ceil(tail / world)`` samples (a smaller last step).

Token datasets (consumed by the FlexSP runtime too): :class:`TokenDataset` (documents of token
ids, ``lengths`` per sample), :func:`pad_collate` (pad to the longest in the batch or to a
multiple, ``attention_mask``, ``labels = -100`` on padding) and :class:`PackedDataset` (whole
documents packed into fixed-length rows with per-document ``position_ids``, ``labels = -100`` on
each document's first token and on padding, and per-row document lengths ``seq_lens``).
Labels follow the Hugging Face convention (aligned with ``input_ids``; the model shifts them);
``shift_labels=True`` gives labels already shifted (``labels[t]`` = the next token of the same
document), the convention of ``dtrain.models.GPT``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from dtrain.errors import UsageError

from dtrain.plugins.base import Plugin

if TYPE_CHECKING:
    from dtrain.engine import Engine

__all__ = ["loader", "DistributedLoader", "DataSlot", "TokenDataset", "PackedDataset", "pad_collate",
           "packed_collate", "IGNORE_INDEX"]

IGNORE_INDEX = -100
"""Label value that cross-entropy ignores (padding, document boundaries)."""

STATE_VERSION = 1


# ------------------------------------------------------------------------------ the loader
def loader(dataset: Dataset, batch_size: int | None = None, *, engine: "Engine | None" = None, shuffle: bool = True,
           seed: int | None = None, drop_last: bool = True, collate_fn: Callable | None = None,
           num_workers: int = 0, rank: int | None = None, world_size: int | None = None,
           **dataloader_kwargs: Any) -> "DistributedLoader":
    """A resumable distributed loader over ``dataset``; ``batch_size`` samples per rank per step.

    With ``engine``, the rank and world size are the engine's, ``seed`` defaults to
    ``train.seed``, and the loader's position joins the engine's checkpoints and snapshots
    (restored at once if the engine resumed). Without it, ``rank``/``world_size`` default to the
    initialised process group (else 0/1) and ``seed`` to 0. Other keyword arguments
    (``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ...) go to ``DataLoader``.
    ``batch_size`` defaults to ``train.micro_batch_size x train.grad_accum`` of the engine's config
    (what ``--deepspeed-config``'s ``train_micro_batch_size_per_gpu`` sets).
    """
    if engine is not None:
        rank = engine.runtime.rank if rank is None else rank
        world_size = engine.runtime.world_size if world_size is None else world_size
        seed = engine.config.train.seed if seed is None else seed
        accum = engine.config.train.grad_accum
        micro = engine.config.train.micro_batch_size
        if batch_size is None and micro is not None:
            batch_size = micro * accum
        if batch_size is not None and batch_size % accum:
            raise UsageError(f"dtrain.data.loader: batch_size={batch_size} (per rank) does not split into "
                             f"train.grad_accum={accum} micro-batches; use a multiple of {accum}")
    if batch_size is None:
        raise UsageError("dtrain.data.loader needs a batch_size (samples per rank per step), or an engine "
                         "whose config sets train.micro_batch_size")
    if rank is None or world_size is None:
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if ready else 0) if rank is None else rank
        world_size = (dist.get_world_size() if ready else 1) if world_size is None else world_size
    made = DistributedLoader(dataset, batch_size, rank=rank, world_size=world_size, shuffle=shuffle,
                             seed=0 if seed is None else seed, drop_last=drop_last, collate_fn=collate_fn,
                             num_workers=num_workers, **dataloader_kwargs)
    if engine is not None:
        engine.attach(made)
    return made


class DistributedLoader:
    """Rank ``rank``'s slices of a seeded stream of global batches, resumable from its position."""

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int, world_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, collate_fn: Callable | None = None,
                 num_workers: int = 0, **dataloader_kwargs: Any) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise UsageError(f"dtrain.data.loader needs a map-style dataset (__len__ and __getitem__), "
                            f"got {type(dataset).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"dtrain.data.loader: batch_size={batch_size!r} must be an integer >= 1 (per rank)")
        if not 0 <= rank < world_size:
            raise UsageError(f"dtrain.data.loader: rank {rank} is not in a world of {world_size}")
        for key in ("sampler", "batch_sampler", "shuffle", "batch_size", "drop_last", "generator"):
            if key in dataloader_kwargs:
                raise UsageError(f"dtrain.data.loader sets {key!r} itself; remove it")
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.collate_fn, self.num_workers, self.dataloader_kwargs = collate_fn, num_workers, dataloader_kwargs
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        if self.num_samples < self.global_batch_size and drop_last:
            raise UsageError(f"dtrain.data.loader: the dataset has {self.num_samples} samples, fewer than one "
                             f"global batch ({batch_size} per rank x {world_size} ranks); use a smaller "
                             f"batch_size or drop_last=False")
        self._epoch, self._offset = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ position
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, samples of that epoch's permutation consumed by the whole job)."""
        return self._epoch, self._offset

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op when it is the current epoch: keeps the offset)."""
        if epoch != self._epoch:
            self._epoch, self._offset = epoch, 0

    def _epoch_end(self) -> int:
        """Samples of an epoch that batches cover (the dropped tail excluded)."""
        g = self.global_batch_size
        return self.num_samples // g * g if self.drop_last else self.num_samples

    def __len__(self) -> int:
        """Batches per (whole) epoch."""
        g = self.global_batch_size
        return self.num_samples // g if self.drop_last else math.ceil(self.num_samples / g)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self._epoch, "offset": self._offset, "seed": self.seed,
                "shuffle": self.shuffle, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (any world size; see the module docstring)."""
        state = {k: (v.item() if torch.is_tensor(v) else v) for k, v in state.items()}
        if state.get("version") != STATE_VERSION:
            raise UsageError(f"dtrain.data.loader: saved position has format version {state.get('version')!r}, "
                             f"this dtrain reads {STATE_VERSION}")
        for key, mine in (("num_samples", self.num_samples), ("seed", self.seed), ("shuffle", self.shuffle)):
            if state[key] != mine:
                raise UsageError(f"dtrain.data.loader: the saved position is for {key}={state[key]!r}, this loader "
                                 f"has {key}={mine!r}; resume with the same dataset, seed and shuffle")
        self._epoch, self._offset = int(state["epoch"]), int(state["offset"])

    # --------------------------------------------------------------- iteration
    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = (epoch, torch.randperm(self.num_samples, generator=g))
            else:
                self._perm = (epoch, torch.arange(self.num_samples))
        return self._perm[1]

    def _plan(self, epoch: int, offset: int) -> list[tuple[list[int], int]]:
        """This rank's index lists of the rest of ``epoch`` from ``offset``, each with the offset after it."""
        perm, end, g, w = self._permutation(epoch), self._epoch_end(), self.global_batch_size, self.world_size
        plan = []
        lo = offset
        while lo < end:
            hi = min(lo + g, end)
            if hi - lo < g and self.drop_last:
                break
            ids = perm[lo:hi]
            per_rank = math.ceil((hi - lo) / w)
            if per_rank * w > hi - lo:  # the short tail of drop_last=False: repeat the first samples
                ids = torch.cat([ids, perm[:per_rank * w - (hi - lo)]])
            plan.append((ids[self.rank * per_rank:(self.rank + 1) * per_rank].tolist(), hi))
            lo = hi
        return plan

    def __iter__(self) -> Iterator[Any]:
        epoch, offset = self._epoch, self._offset
        plan = self._plan(epoch, offset)
        if not plan:  # nothing left in this epoch (e.g. resumed exactly at its end)
            self._epoch, self._offset = epoch + 1, 0
            return
        worker_seed = torch.Generator().manual_seed(hash((self.seed, epoch, offset, self.rank)) & (2**63 - 1))
        inner = DataLoader(self.dataset, batch_sampler=[ids for ids, _ in plan], collate_fn=self.collate_fn,
                           num_workers=self.num_workers, generator=worker_seed, **self.dataloader_kwargs)
        last = len(plan) - 1
        for i, batch in enumerate(inner):
            # The position moves before the batch is handed out: a checkpoint taken in the step
            # that consumes it must already count it.
            if i == last:
                self._epoch, self._offset = epoch + 1, 0
            else:
                self._offset = plan[i][1]
            yield batch


class DataSlot(Plugin):
    """The engine's ``data`` slot: carries the attached loader's position in checkpoints and snapshots.

    It is always present, so a position restored before a loader attaches (the engine resumes in
    its constructor) waits here and is handed over by :meth:`attach`. Its state is the same on
    every rank and independent of the world size (``global_state``).
    """

    name = "data"
    slot = "data"
    global_state: ClassVar[bool] = True

    def __init__(self) -> None:
        self.loader: DistributedLoader | None = None
        self._pending: dict[str, Any] | None = None

    def attach(self, loader: DistributedLoader) -> DistributedLoader:
        if self.loader is not None and self.loader is not loader:
            raise UsageError("this engine already has a dtrain.data loader attached; attach one loader per engine")
        self.loader = loader
        if self._pending is not None:
            loader.load_state_dict(self._pending)
            self._pending = None
        return loader

    def state_dict(self) -> dict[str, Any]:
        if self.loader is not None:
            return self.loader.state_dict()
        return dict(self._pending or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.loader is not None:
            self.loader.load_state_dict(state)
        else:
            self._pending = dict(state)

    def metrics(self) -> dict[str, float]:
        if self.loader is None:
            return {}
        return {"data_epoch": self.loader.epoch, "data_offset": self.loader.position[1]}


# ---------------------------------------------------------------------- token datasets
def _as_ids(doc: Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids = doc if torch.is_tensor(doc) else torch.tensor(list(doc), dtype=torch.long)
    if ids.dim() != 1:
        raise UsageError(f"a document must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    return ids.long()


class TokenDataset(Dataset):
    """Documents of token ids of varying length; item ``i`` is ``{"input_ids": LongTensor}``.

    ``max_length`` truncates longer documents (None: keep them whole). Empty documents are an
    error (they would make a row of nothing but padding). ``lengths`` lists every item's length.
    """

    def __init__(self, documents: Sequence[Sequence[int] | torch.Tensor], max_length: int | None = None) -> None:
        if max_length is not None and max_length < 1:
            raise UsageError(f"TokenDataset: max_length={max_length} must be >= 1")
        self.documents = [_as_ids(d)[:max_length] if max_length else _as_ids(d) for d in documents]
        empty = next((i for i, d in enumerate(self.documents) if d.numel() == 0), None)
        if empty is not None:
            raise UsageError(f"TokenDataset: document {empty} is empty; drop empty documents first")
        self.lengths = [int(d.numel()) for d in self.documents]

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.documents[i]}


def _labels(ids: torch.Tensor, starts: torch.Tensor, valid: torch.Tensor, shift: bool) -> torch.Tensor:
    """Labels of one row: ``ids`` aligned (HF: the model shifts) or shifted by one, -100 where no
    target exists: padding, and across a document boundary (``starts`` marks first tokens)."""
    if shift:
        labels = torch.full_like(ids, IGNORE_INDEX)
        nxt_ok = valid[1:] & ~starts[1:]
        labels[:-1] = torch.where(nxt_ok, ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
        return labels
    return torch.where(valid & ~starts, ids, torch.full_like(ids, IGNORE_INDEX))


def pad_collate(pad_id: int = 0, multiple_of: int = 1, max_length: int | None = None,
                shift_labels: bool = False, with_lengths: bool = False) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
    """A collate function for :class:`TokenDataset` items: right-pad to the longest in the batch,
    rounded up to ``multiple_of`` (and truncated to ``max_length``).

    Returns ``input_ids`` and ``attention_mask`` (1 on tokens, 0 on padding), ``labels`` (-100 on
    padding and on each row's first token, which nothing predicts) and, with ``with_lengths``,
    ``seq_lens`` (each row's token count). ``shift_labels``: see the module docstring.
    """
    if multiple_of < 1:
        raise UsageError(f"pad_collate: multiple_of={multiple_of} must be >= 1")

    def collate(items: list[Any]) -> dict[str, torch.Tensor]:
        docs = [_as_ids(it["input_ids"] if isinstance(it, dict) else it) for it in items]
        if max_length is not None:
            docs = [d[:max_length] for d in docs]
        longest = max(d.numel() for d in docs)
        width = math.ceil(longest / multiple_of) * multiple_of
        if max_length is not None:
            width = min(width, max_length)
        ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(docs), width), dtype=torch.long)
        for i, d in enumerate(docs):
            ids[i, :d.numel()] = d
            mask[i, :d.numel()] = 1
        starts = torch.zeros(width, dtype=torch.bool)
        starts[0] = not shift_labels  # aligned labels: position 0 has no previous token to predict it
        labels = torch.stack([_labels(ids[i], starts, mask[i].bool(), shift_labels) for i in range(len(docs))])
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if with_lengths:
            out["seq_lens"] = torch.tensor([d.numel() for d in docs], dtype=torch.long)
        return out

    return collate


class PackedDataset(Dataset):
    """Whole documents packed into rows of ``seq_len`` tokens, in dataset order (first fit in order).

    A document never crosses rows (one longer than ``seq_len`` is cut into ``seq_len`` pieces,
    each packed as its own document), so each row's ``seq_lens`` are true document lengths, which
    sequence-parallel runtimes (FlexSP) and varlen attention need. Item ``i`` holds ``input_ids``,
    ``labels`` (-100 on every document's first token and on padding), ``position_ids``
    (restarting at 0 per document) and ``seq_lens`` (the row's document lengths, then zeros; width
    ``max_docs``, the most documents in any row). A plain attention over the whole row still sees
    across documents inside it; a model that should not must read ``position_ids`` or ``seq_lens``.
    """

    def __init__(self, documents: "TokenDataset | Sequence[Sequence[int] | torch.Tensor]", seq_len: int,
                 pad_id: int = 0, shift_labels: bool = False) -> None:
        if seq_len < 2:
            raise UsageError(f"PackedDataset: seq_len={seq_len} must be >= 2")
        docs = documents.documents if isinstance(documents, TokenDataset) else [_as_ids(d) for d in documents]
        pieces = [d[a:a + seq_len] for d in docs for a in range(0, d.numel(), seq_len)]
        self.seq_len, self.pad_id, self.shift_labels = seq_len, pad_id, shift_labels
        self.rows: list[list[torch.Tensor]] = []
        used = seq_len
        for piece in pieces:
            if piece.numel() == 0:
                continue
            if used + piece.numel() > seq_len:
                self.rows.append([])
                used = 0
            self.rows[-1].append(piece)
            used += piece.numel()
        self.max_docs = max((len(r) for r in self.rows), default=0)
        self.lengths = [[int(p.numel()) for p in r] for r in self.rows]
        """Per row, its documents' lengths (what a planner bins by)."""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row, n = self.rows[i], self.seq_len
        ids = torch.full((n,), self.pad_id, dtype=torch.long)
        positions = torch.zeros(n, dtype=torch.long)
        starts = torch.zeros(n, dtype=torch.bool)
        at = 0
        for piece in row:
            k = piece.numel()
            ids[at:at + k] = piece
            positions[at:at + k] = torch.arange(k)
            starts[at] = True
            at += k
        valid = torch.arange(n) < at
        seq_lens = torch.zeros(self.max_docs, dtype=torch.long)
        seq_lens[:len(row)] = torch.tensor([p.numel() for p in row], dtype=torch.long)
        return {"input_ids": ids, "labels": _labels(ids, starts, valid, self.shift_labels),
                "position_ids": positions, "seq_lens": seq_lens}


def packed_collate(with_lengths: bool = True) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Stack :class:`PackedDataset` rows; ``with_lengths=False`` drops ``seq_lens`` (for a model
    whose forward does not take it, e.g. a Hugging Face model called with ``**batch``)."""

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        keys = [k for k in items[0] if with_lengths or k != "seq_lens"]
        return {k: torch.stack([it[k] for it in items]) for k in keys}

    return collate
