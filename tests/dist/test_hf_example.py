"""``examples/hf_causal_lm.py`` (a tiny GPT-2 built from a config) at world 2 under ZeRO-3.

Skipped without transformers (``pip install -e ".[hf]"``). The launched run packs documents
(``--pack``: ``position_ids`` per document, ``labels = -100`` at boundaries), reads them through
``dtrain.data.loader`` and builds AdamW param groups from named parameters. Reference: one process
with the same model, the same two per-rank batches of every step (``DistributedLoader`` at
rank 0 and 1 of 2) and what data parallelism computes: the mean of the two batches' losses and
gradients, then the same AdamW step.

Tolerance: per-step losses rel 1e-4. ZeRO-3 adds the two ranks' gradients in another order than
one process (a few fp32 ulps), and Adam's normalised update turns that into parameter changes of
~1e-7 relative per step; over 5 steps the loss moves by far less than 1e-4 relative, while a wrong
batch, a lost param group or a missing average changes it by > 1e-2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.dist,
              pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                 reason="transformers is not installed (pip install -e '.[hf]')")]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_causal_lm.py"
ARGS = ["--steps", "5", "--batch-size", "4", "--seq-len", "64", "--pack", "--documents", "200"]


def _reference() -> list[float]:
    import dtrain.data
    from dtrain.plugins.zero import call_factory

    spec = importlib.util.spec_from_file_location("hf_causal_lm", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(ARGS)
    model = example.build_model(args)
    dataset, collate = example.build_data(args)
    opt = call_factory(example.optimizer_factory(args.lr, args.weight_decay), list(model.named_parameters()))
    iters = [iter(dtrain.data.DistributedLoader(dataset, args.batch_size, rank=r, world_size=2, seed=0,
                                                collate_fn=collate)) for r in range(2)]
    losses = []
    for _ in range(args.steps):
        opt.zero_grad()
        total = 0.0
        for it in iters:
            loss = model(**next(it)).loss / 2
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
    return losses


def test_hf_example_under_zero3_matches_single_process(tmp_path):
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "dtrain.launch.cli", "launch", "--nproc", "2", "--no-progress",
           "--set", "zero.stage=3", "--metrics", str(metrics), str(EXAMPLE), *ARGS]
    # The single-process reference is computed here while the launched ranks start and train.
    log = tmp_path / "launch.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads a pipe while the reference runs
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            reference = _reference()
            proc.wait(timeout=280)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses == pytest.approx(reference, rel=1e-4)
    assert reference[-1] < reference[0] - 0.5  # it trains
    assert records[-1]["summary"] and records[-2]["plugins"]["data_offset"] == 5 * 8
