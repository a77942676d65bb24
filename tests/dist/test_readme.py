"""The README's "Your own model in 10 lines" runs as written, under `dtrain launch --nproc 2`, and
learns (the epoch's mean loss printed on rank 0; the last below the first: the mean, since one batch's
loss on random labels rose across the three epochs in one run of many); its tuple batch reaches the
model as ``model(x)`` and the loss as ``loss_fn(output, (x, y))``. The checkpoint it saves loads
into a plain model. The block is read from README.md, so the test fails when the README's example
breaks.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dtrain

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]


def _own_model_block() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- own-model[^>]*-->\s*```python\n(.*?)```\s*<!-- /own-model -->", text, re.S)
    assert block, "README.md lost its own-model example (between <!-- own-model --> markers)"
    return block.group(1)


def test_own_model_example_trains_under_the_launcher(tmp_path):
    script = tmp_path / "own.py"
    script.write_text(_own_model_block())
    proc = subprocess.run([sys.executable, "-m", "dtrain.launch.cli", "launch", "--nproc", "2", str(script)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"epoch \d: loss ([0-9.]+) on 2 ranks", proc.stdout + proc.stderr)]
    assert len(losses) == 3, proc.stdout + proc.stderr
    assert losses[-1] < losses[0]
    state = dtrain.consolidate(tmp_path / "runs" / "own-model")
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    model.load_state_dict(state, strict=True)
