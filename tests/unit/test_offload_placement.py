"""The offload cost model (dtrain/offload/placement.py): pure arithmetic, checked on hand-made
profiles whose answer follows from the rule (no tolerance needed beyond float rounding)."""
import pytest

from dtrain.offload.placement import GB, choose_placement, staging_shape, transfer_s, uniform_profiles

MB = 2**20


def test_transfer_time_per_tier():
    assert transfer_s(GB, "device", 10, 2, 1) == 0
    assert transfer_s(GB, "host", 10, 2, 1) == pytest.approx(0.2)
    assert transfer_s(GB, "nvme", 10, 2, 1) == pytest.approx(1.5)


def test_budget_decides_what_stays_resident():
    units = uniform_profiles([(f"u{i}", 256 * MB) for i in range(8)], backward_s=1.0, optim_s=0.4)
    everything = choose_placement(units, 4 * GB, 512 * MB, 2.0)  # 2.5 GB of state: all of it fits
    # The NVMe tier streams 8 MB chunks through 4 buffer sets: the pool is 32 MB whatever the unit size.
    roomy = choose_placement(units, 512 * MB + 256 * MB + 32 * MB, 512 * MB, 2.0)  # room for one unit beside it
    tight = choose_placement(units, 512 * MB + 200 * MB, 512 * MB, 2.0)
    assert set(everything.tiers.values()) == {"device"} and everything.step_s < roomy.step_s
    # Units reduced last have no backward left to hide their I/O: they come back to the device first.
    assert roomy.tiers["u7"] == "device" and list(roomy.tiers.values()).count("device") == 1
    assert roomy.device_bytes == 800 * MB
    assert set(tight.tiers.values()) == {"nvme"} and tight.device_bytes == 512 * MB + 32 * MB
    assert tight.step_s > roomy.step_s >= 2.0
    host = choose_placement(units, 512 * MB + 200 * MB, 512 * MB, 2.0, host_budget_bytes=GB)
    assert list(host.tiers.values()).count("host") == 4 and host.step_s < tight.step_s


def test_budget_below_one_staging_set_names_the_minimum():
    units = uniform_profiles([("a", 256 * MB)], backward_s=1.0, optim_s=0.1)
    with pytest.raises(ValueError, match=r"minimum 0\.5001 GB"):  # 512 MB + the smallest set, 2 x 64 KiB
        choose_placement(units, 512 * MB + 64 * 1024, 512 * MB, 1.0)
    small = choose_placement(units, 513 * MB, 512 * MB, 1.0)  # 1 MB of room: the chunks shrink, the unit stays on NVMe
    assert small.tiers == {"a": "nvme"} and small.device_bytes == 513 * MB and small.notes


def test_staging_shape_prefers_smaller_chunks_to_fewer_sets():
    assert staging_shape(None, 2, 10**7) == (4, 1 << 20)  # no budget: 4 MiB per key, 4 sets
    assert staging_shape(None, 2, 3000) == (4, 3072)  # never larger than the largest unit
    sets, elems = staging_shape(26 * MB, 2, 3_171_072)  # the benchmark: 26 MiB of room
    assert sets == 4 and elems % 1024 == 0 and sets * 2 * elems * 4 <= 26 * MB < sets * 2 * (elems + 1024) * 4
    assert staging_shape(2 * 4096, 2, 10**6) == (1, 1024)  # one set of the smallest chunk
    with pytest.raises(ValueError):
        staging_shape(4096, 2, 10**6)
