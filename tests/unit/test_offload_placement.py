"""The offload cost model (dtrain/offload/placement.py): pure arithmetic, checked on hand-made
profiles whose answer follows from the rule (no tolerance needed beyond float rounding)."""
import pytest

from dtrain.offload.placement import GB, choose_placement, transfer_s, uniform_profiles

MB = 2**20


def test_transfer_time_per_tier():
    assert transfer_s(GB, "device", 10, 2, 1) == 0
    assert transfer_s(GB, "host", 10, 2, 1) == pytest.approx(0.2)
    assert transfer_s(GB, "nvme", 10, 2, 1) == pytest.approx(1.5)


def test_budget_decides_what_stays_resident():
    units = uniform_profiles([(f"u{i}", 256 * MB) for i in range(8)], backward_s=1.0, optim_s=0.4)
    everything = choose_placement(units, 4 * GB, 512 * MB, 2.0)  # 2.5 GB of state: all of it fits
    roomy = choose_placement(units, int(1.5 * GB), 512 * MB, 2.0)  # room for one unit next to the pool
    tight = choose_placement(units, int(1.2 * GB), 512 * MB, 2.0)
    assert set(everything.tiers.values()) == {"device"} and everything.step_s < roomy.step_s
    # Units reduced last have no backward left to hide their I/O: they come back to the device first.
    assert roomy.tiers["u7"] == "device" and roomy.tiers["u0"] == "nvme" and roomy.device_bytes <= 1.5 * GB
    assert set(tight.tiers.values()) == {"nvme"} and tight.device_bytes <= 1.2 * GB
    assert tight.step_s > roomy.step_s >= 2.0
    host = choose_placement(units, int(1.2 * GB), 512 * MB, 2.0, host_budget_bytes=GB)
    assert list(host.tiers.values()).count("host") == 4 and host.step_s < tight.step_s


def test_budget_below_one_unit_names_the_minimum():
    units = uniform_profiles([("a", 256 * MB)], backward_s=1.0, optim_s=0.1)
    with pytest.raises(ValueError, match="minimum 0.7500 GB"):
        choose_placement(units, 600 * MB, 512 * MB, 1.0)
