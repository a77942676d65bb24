"""Checkpoints across layouts and world sizes, with the data position carried along.

Saved under each of ddp, ZeRO-1, ZeRO-2 and ZeRO-3 at world 2 after 3 steps; each is loaded under
every layout at world 3 and at world 1, continued 3 steps, and compared with continuing the
original run. The batches come from ``dtrain.data.loader`` with the same global batch (12) at every
world size, so the restored position must select exactly the samples the original run used next:
a position that did not carry over would train on other samples and miss the reference by far
more than the tolerance.

Tolerance: atol 2e-5 / rtol 1e-4, the bound of test_checkpoint.py. The continued steps reduce
gradients over 3 ranks (or none) instead of 2, so only the summation order differs (ulp-level
drift, amplified a little by Adam over 3 steps).
"""
import pytest
import torch
from torch.utils.data import Dataset

import dtrain
from tests.dist.harness import run_world
from tests.dist.workloads import GLOBAL_BATCH, SEQ, make_model, optimizer_factory

pytestmark = pytest.mark.dist
FIRST, SECOND, STAGES = 3, 3, (0, 1, 2, 3)


class Tokens(Dataset):
    """A fixed, seeded token corpus (more samples than the run reads: no epoch wrap)."""

    def __init__(self, n: int = 120) -> None:
        self.data = torch.randint(0, 256, (n, SEQ + 1), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i, :-1], "labels": self.data[i, 1:]}


def _engine_and_batches(stage: int):
    engine = dtrain.wrap(make_model(), optimizer=optimizer_factory,
                         config={"zero": {"stage": stage}, "train": {"clip_grad_norm": 1.0}})
    loader = dtrain.data.loader(Tokens(), GLOBAL_BATCH // engine.runtime.world_size, engine=engine)
    return engine, loader


def _steps(engine, loader, n: int) -> None:
    batches = iter(loader)
    for _ in range(n):
        engine.train_step(next(batches))


def _save_each(root: str) -> dict:
    out = {}
    for stage in STAGES:
        engine, loader = _engine_and_batches(stage)
        _steps(engine, loader, FIRST)
        engine.save(f"{root}/z{stage}")
        _steps(engine, loader, SECOND)
        out[stage] = engine.full_parameters()
    return out


def _load_each(root: str) -> dict:
    out = {}
    for saved in STAGES:
        for stage in STAGES:
            engine, loader = _engine_and_batches(stage)
            engine.load(f"{root}/z{saved}")
            assert engine.step == FIRST and loader.position == (0, FIRST * GLOBAL_BATCH)
            _steps(engine, loader, SECOND)
            out[saved, stage] = engine.full_parameters()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("matrix"))
    return root, run_world(_save_each, 2, root)[0]


@pytest.mark.parametrize("world", [3, 1])
def test_any_layout_loads_into_any_layout(saved, world):
    root, expected = saved
    got = run_world(_load_each, world, root)[0]
    for (src, dst), params in got.items():
        for name, ref in expected[src].items():
            torch.testing.assert_close(params[name], ref, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"saved zero{src} at world 2, loaded zero{dst} at "
                                                     f"world {world}: {name}: {m}")
