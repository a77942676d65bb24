"""dtrain/seqpar/schedule.py and lengths.py without processes: the one-broadcast encoding round-trips,
hand-written plans that cannot run are refused in one line, static schedules respect the token
limit, and the length mixes are deterministic and in range."""
from __future__ import annotations

import pytest

from dtrain.seqpar.lengths import sample_lengths
from dtrain.seqpar.schedule import check, decode, encode, encoded_length, from_spec, static_schedule
from dtrain.seqpar.ulysses import SeqParError


def test_encode_decode_round_trip():
    lengths = [5, 9, 3, 7, 2, 8]
    plan = from_spec([[(2, [1, 0]), (1, [2]), (1, [3])], [(4, [5, 4])]], world_size=4)
    again = decode(encode(plan, len(lengths)), 4)
    assert again.micro_batches == plan.micro_batches
    assert encode(plan, len(lengths)).numel() == encoded_length(len(lengths))
    assert plan.ranges() == [(0, 1), (0, 1, 2, 3)]


@pytest.mark.parametrize("spec, world, heads, words", [
    ([[(1, [0]), (2, [1, 2, 3])]], 4, None, "aligned power-of-two"),
    ([[(4, [0, 1, 2, 3])]], 4, 6, "6 attention heads are not divisible by 4"),
    ([[(2, [0, 1]), (2, [2])]], 4, None, "sequence 3 is in no group"),
    ([[(2, [0, 1]), (2, [1, 2, 3])]], 4, None, "sequence 1 is in two groups"),
    ([[(2, [0, 1, 2, 3])], [(8, [0])]], 4, None, "inside the 4 ranks"),
])
def test_check_refuses(spec, world, heads, words):
    with pytest.raises(SeqParError, match=words):
        check(from_spec(spec), world, [4, 4, 4, 4], heads, None)


def test_check_other_world_and_token_limit():
    with pytest.raises(SeqParError, match="plan is for 8 ranks but this job has 4"):
        check(from_spec([[(4, [0])]], world_size=8), 4, [3], None, None)
    with pytest.raises(SeqParError, match="holds 9 tokens, more than 1 x seqpar.max_tokens_per_rank=8"):
        check(from_spec([[(1, [0, 1]), (1, [2])]]), 2, [5, 4, 1], None, 8)


def test_static_schedule_respects_room_and_covers_batch():
    lengths = [30, 5, 17, 9, 12, 3, 25]
    plan = static_schedule(lengths, 4, 2, 16, lambda s, d: s * s / d)
    check(plan, 4, lengths, 4, 16)
    assert {g.size for mb in plan.micro_batches for g in mb} == {2}
    with pytest.raises(SeqParError, match="sequence 0 has 30 tokens"):
        static_schedule(lengths, 4, 1, 16, lambda s, d: s)


@pytest.mark.parametrize("mix", ["longtail", "lognormal", "fixed"])
def test_length_mixes(mix):
    a = sample_lengths(mix, 64, 3, 1024)
    assert a == sample_lengths(mix, 64, 3, 1024) and all(2 <= n <= 1024 for n in a)
    if mix == "longtail":
        assert max(a) >= 512 and sorted(a)[32] < 200
