"""`dtrain launch --deepspeed-config` at world 2, then `dtrain plot` of that run's metrics.

One real launch (tiny GPT, 6 steps, a rank killed after step 3 and the group restarted once) checks
that every rank got the DeepSpeed config's mapped settings with the command line's --set on top,
and produces a real metrics file with a fault and a restart for `dtrain plot` to draw. The plot
is checked as a PNG (signature, header, plausible size), not pixel by pixel.
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG = ROOT / "tests" / "data" / "deepspeed" / "bf16_zero2.json"

SCRIPT = """
import json, torch, dtrain
from dtrain.models import GPT, GPTConfig

torch.manual_seed(0)
model = GPT(GPTConfig.preset("tiny", vocab_size=256))
engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), total_steps=6)
cfg = engine.config
print("CONFIG " + json.dumps({"train": vars(cfg.train), "zero": vars(cfg.zero)}), flush=True)
rows = cfg.train.micro_batch_size * cfg.train.grad_accum
while engine.step < 6:
    g = torch.Generator().manual_seed(engine.step * 2 + engine.runtime.rank)
    x = torch.randint(0, 256, (rows, 33), generator=g)
    engine.train_step({"input_ids": x[:, :-1], "labels": x[:, 1:]})
engine.close()
"""


def _run(args, timeout):
    proc = subprocess.Popen([sys.executable, "-m", "dtrain.launch.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, err


def test_deepspeed_config_launch_then_plot(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    metrics = tmp_path / "ds.jsonl"
    rc, out, err = _run(["launch", "--nproc", "2", "--no-progress", "--deepspeed-config", str(DS_CONFIG),
                         "--set", "zero.stage=1", "--metrics", str(metrics), "--max-restarts", "1",
                         "--inject", "kill:rank=1,step=3", str(script)], timeout=240)
    assert rc == 0, out[-2000:] + err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("dtrain: warning: bf16_zero2.json:")]
    assert len(warnings) == 1 and "zero_optimization.overlap_comm" in warnings[0]  # once, not per rank
    configs = {}
    for m in re.finditer(r"\[rank (\d)\] CONFIG (.*)", out):
        configs.setdefault(int(m.group(1)), json.loads(m.group(2)))
    assert sorted(configs) == [0, 1], out[-2000:]
    for cfg in configs.values():
        train, zero = cfg["train"], cfg["zero"]
        assert (train["micro_batch_size"], train["grad_accum"], train["clip_grad_norm"], train["precision"]) == \
            (2, 2, 1.0, "bf16")
        assert zero["stage"] == 1  # --set wins over the mapped zero_optimization.stage = 2
        assert zero["bucket_mb"] == pytest.approx(5e8 * 4 / 2**20)

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert any(r.get("event") == "fault" for r in records) and any(r.get("event") == "restart" for r in records)
    png = tmp_path / "plot" / "ds.png"
    # a second, header-less copy overlaid as another run: the legend names both files
    (tmp_path / "copy.jsonl").write_text(metrics.read_text())
    rc, out, err = _run(["plot", str(metrics), str(tmp_path / "copy.jsonl"), "-o", str(png)], timeout=120)
    assert rc == 0, err
    assert f"wrote {png} (2 run(s)" in err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1200 and height >= 700 and 30_000 < len(data) < 2_000_000, (width, height, len(data))

    rc, _, err = _run(["plot", str(tmp_path / "missing.jsonl")], timeout=60)
    assert rc == 2 and err.strip() == f"error: metrics file '{tmp_path / 'missing.jsonl'}' does not exist"
