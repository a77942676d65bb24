"""Cost model, model shapes and cluster files."""
from __future__ import annotations

from pathlib import Path

import pytest

from dtrain.planner import ClusterSpec, CostModel, PlannerError, load_cluster, parse_model
from dtrain.planner.cluster import REPO_CLUSTER_DIR, cluster_from_dict

A100 = REPO_CLUSTER_DIR / "a100_8x8.toml"
CPU = REPO_CLUSTER_DIR / "cpu_local.toml"


def test_shipped_cluster_files_load_and_match_builtin_defaults() -> None:
    spec = load_cluster(A100)
    builtin = ClusterSpec()
    for name in ("num_devices", "devices_per_node", "memory_GiB", "linear_TFLOPS",
                 "attention_TFLOPS", "intra_node_GBps", "inter_node_GBps",
                 "activation_bytes_per_token_layer_hidden"):
        assert getattr(spec, name) == getattr(builtin, name), name
    assert spec.num_devices == 64 and spec.num_nodes == 8
    cpu = load_cluster(CPU)
    assert cpu.num_devices >= 1 and 2 in cpu.alltoall_GBps


def test_toml_round_trip(tmp_path: Path) -> None:
    spec = ClusterSpec(name="x", alltoall_GBps={2: 3.5, 4: 2.25}, calibration={"note": "hi", "k": 1.5})
    path = tmp_path / "c.toml"
    path.write_text(spec.to_toml())
    assert load_cluster(path) == spec


def test_cluster_errors(tmp_path: Path) -> None:
    with pytest.raises(PlannerError, match="whole number of nodes"):
        ClusterSpec(num_devices=60, devices_per_node=8)
    with pytest.raises(PlannerError, match="power of two"):
        ClusterSpec(num_devices=12, devices_per_node=6)
    with pytest.raises(PlannerError, match="unknown key"):
        cluster_from_dict({"device": {"memory_gb": 3}})
    with pytest.raises(PlannerError, match="does not exist"):
        load_cluster(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[device\n")
    with pytest.raises(PlannerError, match="not valid TOML"):
        load_cluster(bad)


def test_model_presets_and_parsing() -> None:
    m = parse_model("7b")
    assert 6.5e9 < m.num_params < 7.0e9  # LLaMA-2 7B: 6.74e9
    custom = parse_model("layers=32,hidden=4096,heads=32,vocab=32000")
    assert custom.ffn == 4 * 4096 and custom.layers == 32
    assert parse_model("gpt-bench").hidden == 576
    for bad in ("7x", "layers=32,hidden=4096", "layers=a,hidden=1,heads=1,vocab=1",
                "layers=2,hidden=100,heads=3,vocab=10", "layers=2,hidden=64,heads=2,vocab=10,foo=1",
                "layers=0,hidden=64,heads=2,vocab=10", ""):
        with pytest.raises(PlannerError):
            parse_model(bad)


def test_cost_equations() -> None:
    model, cluster = parse_model("7b"), ClusterSpec()
    cost = CostModel(model, cluster)
    s = 8192
    assert cost.compute_time(s, 4) == pytest.approx((cost.alpha1 * s * s + cost.alpha2 * s) / 4 + cost.beta1)
    assert cost.alpha1 == pytest.approx(6 * 4096 * 32 / 160e12)
    assert cost.comm_time(s, 1) == 0.0
    expected = 8 * 32 * (10e-6 + s * 4096 * 2 * 3 / 16 / 120e9)
    assert cost.comm_time(s, 4) == pytest.approx(expected)
    # bandwidth drops once a group crosses nodes
    assert cluster.alltoall_bandwidth(8) == pytest.approx(120e9)
    assert cluster.alltoall_bandwidth(16) < cluster.alltoall_bandwidth(8) / 10
    assert cost.seq_times([s, 2 * s], 16).tolist() == pytest.approx(
        [cost.seq_time(s, 16), cost.seq_time(2 * s, 16)])


def test_min_degree_is_smallest_fitting_power_of_two() -> None:
    cost = CostModel(parse_model("7b"), ClusterSpec())
    tpd = cost.tokens_per_device
    for s in (1, int(tpd) - 1, int(tpd) + 1, int(3 * tpd), int(8 * tpd), int(32 * tpd)):
        d = cost.min_degree(s)
        assert cost.fits(s, d) and (d == 1 or not cost.fits(s, d // 2))
    # 64 devices would hold it, but a group of 64 cannot split the 7b's 32 heads.
    assert cost.group_sizes == [1, 2, 4, 8, 16, 32]
    assert cost.min_degree(int(33 * tpd)) is None
