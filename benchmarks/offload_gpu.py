"""GPU check of the offload tier (run on a machine with CUDA; CI never has one).

One rank on ``cuda:0``: the tiny GPT trained 10 steps (grad accumulation 2, clipping, and once
without clipping so units step inside backward) under ddp (small buckets) and ZeRO-3, in memory
and with ``offload.optim`` = host (pinned host state, copied to the device per unit) and nvme
(O_DIRECT files under ``--dir``); prints whether parameters (``param_sha256``) and every
element-wise optimizer state byte equal the in-memory run's, then times the ``bench`` GPT in
memory / nvme / nvme without overlap. Exits 1 if any comparison differs.

    python benchmarks/offload_gpu.py --dir /tmp/offload
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def digest(engine) -> str:
    from dtrain.checkpoint import _flat

    h = hashlib.sha256()
    for key in ("exp_avg", "exp_avg_sq"):
        for shard in engine.layout.shards(f"optim.{key}"):
            h.update(_flat(shard).tensor().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/dtrain-offload-gpu")
    ap.add_argument("--bench-steps", type=int, default=5)
    args = ap.parse_args()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    os.makedirs(args.dir, exist_ok=True)
    import torch

    import dtrain
    from dtrain.models import GPT, GPTConfig
    from tests.dist.workloads import local_batch, make_model, optimizer_factory

    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0), flush=True)
    ok = True
    for stage in (0, 3):
        for clip in (1.0, None):
            ref = None
            for tier in (None, "host", "nvme"):
                cfg = {"zero": {"stage": stage, "bucket_mb": 0.05},
                       "train": {"grad_accum": 2, "clip_grad_norm": clip}}
                if tier:
                    cfg["offload"] = {"enabled": True, "optim": tier, "dir": args.dir}
                engine = dtrain.wrap(make_model(), optimizer=optimizer_factory, config=cfg)
                assert engine.device.type == "cuda", engine.device
                for step in range(10):
                    engine.train_step({k: v.cuda() for k, v in local_batch(step, 0, 1).items()})
                got = (engine.param_sha256(), digest(engine))
                extra = engine.plugins[1].metrics() if tier else {}
                engine.close()
                if ref is None:
                    ref = got
                same = got == ref
                ok &= same
                print(json.dumps({"stage": stage, "clip": clip, "tier": tier, "identical": same, **extra}), flush=True)
    for variant in ("memory", "nvme", "nvme-serial", "memory"):
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset("bench", block_size=128))
        cfg = {"zero": {"stage": 3}}
        if variant != "memory":
            cfg["offload"] = {"enabled": True, "optim": "nvme", "dir": args.dir, "overlap": variant == "nvme"}
        engine = dtrain.wrap(model, optimizer=optimizer_factory, config=cfg)
        times, g = [], torch.Generator().manual_seed(0)
        for step in range(args.bench_steps + 1):
            x = torch.randint(0, 8192, (8, 129), generator=g).cuda()
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.train_step({"input_ids": x[:, :-1], "labels": x[:, 1:]})
            torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - t)
        extra = engine.plugins[1].metrics() if variant != "memory" else {}
        print(json.dumps({"bench": variant, "step_s": statistics.median(times),
                          "max_alloc_gb": torch.cuda.max_memory_allocated() / 2**30, **extra}), flush=True)
        torch.cuda.reset_peak_memory_stats()
        engine.close()
    print("ALL IDENTICAL" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
