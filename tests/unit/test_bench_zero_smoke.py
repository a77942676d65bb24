"""Smoke test for ``benchmarks/zero.py``: a ``--quick`` run of FSDP2 and DeepSpeed ZeRO-3.

Owns only this check: the benchmark launches fresh 2-rank runs, and its JSON report holds a
step time and a final loss for every requested (framework, precision).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "zero.py"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero_bench_quick(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    frameworks = ["fsdp2", "deepspeed-zero3"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--frameworks", ",".join(frameworks),
         "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "zero.json").read_text())
    assert (tmp_path / "zero.png").stat().st_size > 0
    for prec in ("fp32", "bf16"):
        for fw in frameworks:
            entry = doc["results"][prec][fw]
            assert entry["status"] == "ok", entry.get("errors")
            step = entry["step_time_s"]["median"]
            assert step is not None and step > 0
            assert math.isfinite(entry["final_loss"])
            assert entry["peak_rss_bytes"]["median"] > 0
        # same seed, same data: FSDP2 and DeepSpeed agree on the loss
        losses = [doc["results"][prec][fw]["final_loss"] for fw in frameworks]
        assert max(losses) - min(losses) < 0.05, losses
