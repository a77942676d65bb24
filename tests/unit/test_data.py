"""dtrain.data without processes: global batches, resumable positions, token padding and packing.

Every rank is simulated by its own loader with an explicit ``rank``/``world_size``; the checks are
exact (sample indices and token ids), so there is no tolerance.
"""
from __future__ import annotations

import pytest
import torch

from dtrain.data import (IGNORE_INDEX, DataSlot, DistributedLoader, PackedDataset, TokenDataset, pad_collate,
                         packed_collate)
from dtrain.plugins.zero import call_factory
from dtrain.errors import UsageError


class Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def make(n: int, batch: int, world: int, rank: int, **kw) -> DistributedLoader:
    return DistributedLoader(Indices(n), batch, rank=rank, world_size=world, seed=kw.pop("seed", 3), **kw)


def global_batches(n: int, batch: int, world: int, steps: int, states=None, **kw) -> list[list[int]]:
    """``steps`` global batches (ranks' slices concatenated in rank order), across epochs."""
    loaders = [make(n, batch, world, r, **kw) for r in range(world)]
    for ld in loaders:
        if states is not None:
            ld.load_state_dict(states)
    its = [iter(ld) for ld in loaders]
    out = []
    while len(out) < steps:
        try:
            out.append([i for it in its for i in next(it).tolist()])
        except StopIteration:
            its = [iter(ld) for ld in loaders]
    return out, loaders


def test_global_batches_are_a_permutation_split_over_ranks_and_independent_of_world():
    two, _ = global_batches(23, 3, 2, 3)  # 23 // 6 = 3 batches; 5 samples dropped
    flat = [i for b in two for i in b]
    assert len(set(flat)) == 18 and all(len(b) == 6 for b in two)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(3)).tolist()
    assert flat == perm[:18]
    six, _ = global_batches(23, 1, 6, 3)
    three, _ = global_batches(23, 2, 3, 3)
    assert two == three == six  # same global batch size -> same batches at any world size


def test_epochs_reshuffle_and_position_moves_to_the_next_epoch_after_the_last_batch():
    ld = make(12, 2, 1, 0)
    first = [b.tolist() for b in ld]
    assert ld.position == (1, 0) and len(first) == len(ld) == 6
    second = [b.tolist() for b in ld]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(12)) and first != second
    unshuffled = make(5, 2, 1, 0, shuffle=False)
    assert [b.tolist() for b in unshuffled] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("stop", [1, 4, 5, 9])
def test_resume_from_any_position_sees_the_same_batches(stop):
    reference, _ = global_batches(20, 2, 2, 12)  # 5 batches per epoch: crosses two epoch ends
    head, loaders = global_batches(20, 2, 2, stop)
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)  # the position is global: every rank saves the same
    tail, _ = global_batches(20, 2, 2, 12 - stop, states=states[0])
    assert head + tail == reference


def test_resume_at_another_world_size_with_the_same_global_batch():
    reference, _ = global_batches(30, 2, 3, 8)  # global batch 6
    _, loaders = global_batches(30, 2, 3, 3)
    tail, _ = global_batches(30, 3, 2, 5, states=loaders[0].state_dict())
    assert reference[3:] == tail


def test_drop_last_false_pads_the_tail_to_every_rank():
    loaders = [make(11, 2, 2, r, drop_last=False) for r in range(2)]
    per_rank = [[b.tolist() for b in ld] for ld in loaders]
    assert [len(b) for b in per_rank[0]] == [2, 2, 2] and [len(b) for b in per_rank[1]] == [2, 2, 2]
    assert len(loaders[0]) == 3
    seen = {i for rank in per_rank for b in rank for i in b}
    assert seen == set(range(11))  # the 12th slot repeats the permutation's first sample


def test_position_counts_handed_out_batches_not_prefetched_ones():
    ld = make(40, 2, 1, 0, num_workers=2, prefetch_factor=4)
    it = iter(ld)
    next(it), next(it), next(it)
    assert ld.position == (0, 6)


def test_iterating_never_draws_from_the_global_rng():
    before = torch.get_rng_state()
    list(make(10, 2, 1, 0, num_workers=1))
    assert torch.equal(before, torch.get_rng_state())


def test_a_position_for_another_dataset_or_seed_is_refused():
    state = make(10, 2, 1, 0).state_dict()
    with pytest.raises(ValueError, match="num_samples=10"):
        make(11, 2, 1, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make(10, 2, 1, 0, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make(3, 2, 2, 0)
    with pytest.raises(UsageError, match="sampler"):
        make(10, 2, 1, 0, sampler=None)


def test_data_slot_holds_a_restored_position_until_a_loader_attaches():
    saved = make(20, 2, 1, 0)
    it = iter(saved)
    next(it), next(it)
    slot = DataSlot()
    assert slot.state_dict() == {}
    slot.load_state_dict(saved.state_dict())
    fresh = slot.attach(make(20, 2, 1, 0))
    assert fresh.position == (0, 4) and slot.state_dict() == saved.state_dict()
    assert next(iter(fresh)).tolist() == next(it).tolist()


# ---------------------------------------------------------------------------- token batches
def test_pad_collate_pads_masks_and_ignores_padding():
    ds = TokenDataset([[5, 6, 7], [8], [9, 10, 11, 12, 13]], max_length=4)
    assert ds.lengths == [3, 1, 4]
    out = pad_collate(pad_id=0, multiple_of=8)([ds[0], ds[1]])
    assert out["input_ids"].shape == (2, 8)
    assert out["input_ids"][0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert out["attention_mask"][1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert out["labels"][0].tolist() == [IGNORE_INDEX, 6, 7] + [IGNORE_INDEX] * 5  # HF: the model shifts
    shifted = pad_collate(shift_labels=True, with_lengths=True)([ds[0], ds[2]])
    assert shifted["labels"][0].tolist() == [6, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert shifted["labels"][1].tolist() == [10, 11, 12, IGNORE_INDEX]
    assert shifted["seq_lens"].tolist() == [3, 4]


def test_packing_keeps_documents_whole_with_their_own_positions_and_boundaries():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
    ds = PackedDataset(docs, seq_len=6)
    assert ds.lengths == [[3, 2], [4], [6], [1]]  # the 7-token document is cut into 6 + 1
    row = ds[0]
    assert row["input_ids"].tolist() == [1, 2, 3, 4, 5, 0]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 0]
    assert row["labels"].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]
    assert row["seq_lens"].tolist() == [3, 2]
    shifted = PackedDataset(docs, seq_len=6, shift_labels=True)[0]["labels"].tolist()
    assert shifted == [2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]
    batch = packed_collate()([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 6) and batch["seq_lens"].tolist() == [[3, 2], [4, 0]]
    assert "seq_lens" not in packed_collate(with_lengths=False)([ds[0]])


def test_optimizer_factory_gets_names_when_it_asks_for_them():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    named = list(model.named_parameters())
    opt = call_factory(lambda named: torch.optim.AdamW(
        [{"params": [p for n, p in named if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}]), named)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]

    def named_params(named_params):
        return torch.optim.SGD([p for _, p in named_params], lr=0.1)
    assert len(call_factory(named_params, named).param_groups[0]["params"]) == 4
    assert len(call_factory(lambda p: torch.optim.SGD(p, lr=0.1), named).param_groups[0]["params"]) == 4
    assert len(call_factory(torch.optim.Adam, named).param_groups[0]["params"]) == 4  # first arg "params"
