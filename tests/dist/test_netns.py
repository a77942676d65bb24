"""The slow-link harness: 2 namespaced hosts with a tbf limit, an all-reduce across them, cleanup.

Skipped (with the reason) where namespaces cannot be made: not root, or ``ip``/``tc`` missing
(Debian/Ubuntu package ``iproute2``).
"""
import sys
import textwrap

import pytest

from dtrain import netns

pytestmark = [pytest.mark.dist, pytest.mark.slow]
REASON = netns.unavailable_reason()

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.full((int(sys.argv[1]),), float(dist.get_rank() + 1))
    t0 = time.perf_counter()
    dist.all_reduce(t)
    dt = time.perf_counter() - t0
    assert torch.all(t == 3.0), t[:4]
    with open(sys.argv[2] + f".{dist.get_rank()}", "w") as f:
        f.write(f"{dt} {os.environ['DTRAIN_NETNS']}")
    dist.destroy_process_group()
""")


@pytest.mark.skipif(REASON is not None, reason=f"slow-link harness unavailable: {REASON}")
def test_two_hosts_tbf_all_reduce_and_cleanup(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    numel = 1_500_000  # 6 MB: each rank sends 6 MB = 48 Mbit, >= 0.48 s at 100 Mbit
    with netns.create_hosts(2, "100mbit", prefix="dtrain-t") as hosts:
        assert hosts.names == ["dtrain-t-n0", "dtrain-t-n1"]
        qdisc = hosts.exec(0, "tc", "qdisc", "show", "dev", "eth0").stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc, qdisc
        procs = netns.spawn_ranks(hosts, 1, [str(script), str(numel), str(out)], port=29541)
        assert netns.wait_all(procs, timeout_s=120) == [0, 0]
        results = [(tmp_path / f"out.{r}").read_text().split() for r in range(2)]
        assert [ns for _, ns in results] == hosts.names
        assert min(float(dt) for dt, _ in results) > 0.35, "the link is not rate-limited"
        assert netns.leftovers("dtrain-t")
    assert netns.leftovers("dtrain-t") == []


@pytest.mark.skipif(REASON is not None, reason=f"slow-link harness unavailable: {REASON}")
def test_failure_half_way_removes_everything(monkeypatch):
    real = netns._run

    def failing(*args, check=True):
        if args[:3] == ("tc", "qdisc", "add") and "dtrain-f-v1" in args:
            raise netns.NetnsError("injected failure")
        return real(*args, check=check)

    monkeypatch.setattr(netns, "_run", failing)
    with pytest.raises(netns.NetnsError, match="injected"):
        netns.create_hosts(2, "1gbit", prefix="dtrain-f")
    monkeypatch.setattr(netns, "_run", real)
    assert netns.leftovers("dtrain-f") == []


def test_net_spec_parsing():
    assert netns.parse_net_spec("bw=100mbit") == {"rate": "100mbit"}
    assert netns.parse_net_spec("bw=1gbit,latency=5ms,burst=1mb")["burst"] == "1mb"
    assert netns.default_burst("1gbit") == "1000000b"
    with pytest.raises(ValueError, match="bw=RATE"):
        netns.parse_net_spec("latency=5ms")
    with pytest.raises(ValueError, match="100mbit"):
        netns.parse_net_spec("bw=fast")
