"""``LayoutPlugin.state_bytes`` (a formula over shapes) agrees with the bytes the rank really holds.

The benchmarks report every framework's state from storage: the unique untyped storages reachable
from the parameters, gradients, optimizer state and the layout's shards
(:func:`dtrain.metrics.layout_storage_bytes`, also used by ``benchmarks/_bench_util.py``). The
metrics stream reports the layout's own formula. Both count bytes exactly, so they must be equal
(no tolerance), for ddp and ZeRO-1/2/3 on a real world-2 gloo group, after optimizer steps (AdamW
state exists) and with the workload's frozen parameter. A formula that forgets a buffer the layout
keeps, or one that charges a buffer the layout frees, fails here.
"""
import pytest

import dtrain
from dtrain.metrics import layout_storage_bytes
from tests.dist.harness import run_world
from tests.dist.workloads import local_batch, make_model, optimizer_factory

pytestmark = pytest.mark.dist

STAGES = (0, 1, 2, 3)


def _formula_and_storage() -> dict[int, tuple[dict, dict]]:
    out = {}
    for stage in STAGES:
        engine = dtrain.wrap(make_model(), optimizer=optimizer_factory, config={"zero": {"stage": stage}})
        rank, world = engine.runtime.rank, engine.runtime.world_size
        for step in range(2):
            engine.train_step(local_batch(step, rank, world))
        out[stage] = (engine.state_bytes(), layout_storage_bytes(engine.model, engine.layout))
    return out


def test_formula_equals_storage_ddp_and_zero():
    for rank_result in run_world(_formula_and_storage, 2):
        for stage, (formula, storage) in rank_result.items():
            assert formula == storage, f"zero stage {stage}: formula {formula} != storage {storage}"
        # sanity: the figures are not trivially equal (sharding really shrinks state)
        assert rank_result[3][1]["params"] < rank_result[0][1]["params"]
        assert rank_result[1][1]["optim"] < rank_result[0][1]["optim"]
