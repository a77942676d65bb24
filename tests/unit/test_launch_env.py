"""Unit tests for dtrain.launch.env: parsing the launcher's environment contract."""

from __future__ import annotations

import json

import pytest

from dtrain.launch.env import LaunchEnv, read_launch_env


def test_defaults_when_nothing_set() -> None:
    env = read_launch_env({})
    assert env == LaunchEnv()
    assert (env.world_size, env.rank, env.local_rank, env.nodes, env.nproc_per_node) == (1, 0, 0, 1, 1)
    assert env.metrics_path is None and env.config_path is None and env.timeout_s is None
    assert env.overrides == [] and env.inject == []
    assert env.progress is False and env.restart_count == 0
    assert env.node_rank == 0 and not env.is_distributed


def test_full_dtrain_launch_env() -> None:
    env = read_launch_env(
        {
            "WORLD_SIZE": "4",
            "RANK": "3",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "DTRAIN_NODES": "2",
            "DTRAIN_NPROC": "2",
            "DTRAIN_METRICS": "/tmp/m.jsonl",
            "DTRAIN_OVERRIDES": json.dumps(["train.lr=0.1", "model.layers=2"]),
            "DTRAIN_CONFIG": "/tmp/c.json",
            "DTRAIN_PROGRESS": "1",
            "DTRAIN_TIMEOUT_S": "12.5",
            "DTRAIN_INJECT": json.dumps(["kill:rank=1,step=3"]),
            "TORCHELASTIC_RESTART_COUNT": "2",
            "TORCHELASTIC_MAX_RESTARTS": "3",
        }
    )
    assert (env.world_size, env.rank, env.local_rank, env.nodes, env.nproc_per_node) == (4, 3, 1, 2, 2)
    assert env.node_rank == 1 and env.is_distributed
    assert env.metrics_path == "/tmp/m.jsonl" and env.config_path == "/tmp/c.json"
    assert env.overrides == ["train.lr=0.1", "model.layers=2"]
    assert env.progress is True and env.timeout_s == 12.5
    assert env.inject == ["kill:rank=1,step=3"]
    assert env.restart_count == 2 and env.max_restarts == 3


def test_plain_torchrun_derives_nodes_from_local_world_size() -> None:
    env = read_launch_env({"WORLD_SIZE": "6", "RANK": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3"})
    assert (env.nodes, env.nproc_per_node, env.node_rank) == (2, 3, 1)


def test_plain_torchrun_single_node() -> None:
    env = read_launch_env({"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "2"})
    assert (env.nodes, env.nproc_per_node, env.local_rank) == (1, 3, 2)


def test_only_nodes_given_derives_nproc() -> None:
    env = read_launch_env({"WORLD_SIZE": "4", "RANK": "2", "DTRAIN_NODES": "2"})
    assert (env.nodes, env.nproc_per_node, env.local_rank) == (2, 2, 0)


def test_world_size_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"WORLD_SIZE=4 does not match DTRAIN_NODES=3 x DTRAIN_NPROC=2"):
        read_launch_env({"WORLD_SIZE": "4", "RANK": "0", "DTRAIN_NODES": "3", "DTRAIN_NPROC": "2"})


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 must be < WORLD_SIZE=2"),
        ({"DTRAIN_OVERRIDES": "[oops"}, "DTRAIN_OVERRIDES is not valid JSON"),
        ({"DTRAIN_OVERRIDES": '{"a": 1}'}, "DTRAIN_OVERRIDES must be a JSON list of strings"),
        ({"DTRAIN_INJECT": "[1, 2]"}, "DTRAIN_INJECT must be a JSON list of strings"),
        ({"DTRAIN_TIMEOUT_S": "soon"}, "DTRAIN_TIMEOUT_S='soon' is not a number"),
        ({"DTRAIN_TIMEOUT_S": "-1"}, "DTRAIN_TIMEOUT_S=-1.0 must be > 0"),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "3"}, "not divisible by LOCAL_WORLD_SIZE=3"),
        ({"WORLD_SIZE": "4", "DTRAIN_NPROC": "3"}, "not divisible by DTRAIN_NPROC=3"),
    ],
)
def test_invalid_values_raise_value_error(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_launch_env(environ)


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_progress_flag(value: str, expected: bool) -> None:
    assert read_launch_env({"DTRAIN_PROGRESS": value}).progress is expected


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "DTRAIN_NPROC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DTRAIN_NODES", "1")
    monkeypatch.setenv("DTRAIN_METRICS", "m.json")
    env = read_launch_env()
    assert env.metrics_path == "m.json" and env.world_size == 1


def test_launcher_env_round_trips_through_reader() -> None:
    """What dtrain_env() writes, read_launch_env() reads back (with the agent's torchrun variables)."""
    from dtrain.launch.local import LaunchSpec, dtrain_env

    spec = LaunchSpec(
        script="x.py",
        nproc=3,
        nodes=2,
        metrics="/m",
        overrides=["a.b=1"],
        config="/c",
        collective_timeout_s=30,
        inject=["slow:rank=0"],
        progress=False,
    )
    environ = dtrain_env(spec)
    environ.update(WORLD_SIZE="6", RANK="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="3")
    env = read_launch_env(environ)
    assert (env.nodes, env.nproc_per_node, env.node_rank, env.local_rank) == (2, 3, 1, 1)
    assert env.metrics_path == "/m" and env.config_path == "/c" and env.timeout_s == 30.0
    assert env.overrides == ["a.b=1"] and env.inject == ["slow:rank=0"] and env.progress is False
