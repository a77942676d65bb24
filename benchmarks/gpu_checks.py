"""GPU checks of the ZO2 streaming path and the NCCL path (run on a CUDA machine; CI never has one).

One process on ``cuda:0`` with the NCCL backend (world 1: a single GPU cannot host two NCCL ranks):

* ``nccl``: ddp and ZeRO-1/2/3 train the tiny GPT 5 steps (AdamW, grad accumulation 2, clipping)
  through dtrain's Comm on NCCL with CUDA tensors, and end within atol 2e-4 of plain single-process
  PyTorch on the CPU. Tolerance: cuBLAS and the CPU GEMM sum in different orders (~1e-6 relative
  per op); Adam's normalised update turns that into at most a few lr-sized (3e-3) differences on
  near-zero coordinates over 5 steps, while a wrong reduction or a stale shard moves parameters by
  whole updates. The four layouts must also agree with each other on the GPU.
* ``zo2``: ``zo2.stream`` = off, host (prefetch 1 and 0) and nvme give bit-identical parameters
  (``param_sha256``) after 10 steps with CUDA tensors and pinned host blocks; then the ``bench``
  GPT's median step time and peak CUDA memory for off / host / host without prefetch.

Prints one JSON line per case and ``ALL CHECKS PASSED`` or ``FAILED``; exit status 1 on failure.

    python benchmarks/gpu_checks.py [--dir /tmp/zo2-nvme] [--bench-steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
DEV = "cpu"  # set in main(): "cuda" when a GPU is present (a CPU run is a smoke test of this script)


def sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def nccl_checks() -> bool:
    import torch

    import dtrain
    from tests.dist.workloads import local_batch, make_model, optimizer_factory, reference_train

    _, ref = reference_train(5, grad_accum=2, clip=1.0)
    ok, first = True, None
    for stage in (0, 1, 2, 3):
        cfg = {"zero": {"stage": stage, "bucket_mb": 0.05}, "train": {"grad_accum": 2, "clip_grad_norm": 1.0}}
        engine = dtrain.wrap(make_model(), optimizer=optimizer_factory, config=cfg)
        backend = torch.distributed.get_backend()
        for step in range(5):
            engine.train_step({k: v.to(DEV) for k, v in local_batch(step, 0, 1).items()})
        params = {n: t.float().cpu() for n, t in engine.full_parameters().items()}
        engine.close()
        diff = max(float((params[n] - ref[n]).abs().max()) for n in ref)
        first = first or params
        spread = max(float((params[n] - first[n]).abs().max()) for n in ref)
        good = backend == ("nccl" if DEV == "cuda" else "gloo") and diff <= 2e-4 and spread <= 2e-4
        ok &= good
        print(json.dumps({"check": "nccl", "stage": stage, "backend": backend, "max_abs_vs_cpu": diff,
                          "max_abs_vs_ddp_gpu": spread, "ok": good}), flush=True)
    return ok


def zo2_checks(directory: str, bench_steps: int) -> bool:
    import torch

    import dtrain
    from dtrain.models import GPT, GPTConfig
    from tests.dist.workloads import local_batch, make_model

    zo = {"enabled": True, "lr": 1e-3, "eps": 1e-3, "weight_decay": 0.1, "seed": 7}
    ok, ref = True, None
    for stream, prefetch in (("off", 1), ("host", 1), ("host", 0), ("nvme", 1)):
        cfg = {"zo2": {**zo, "stream": stream, "prefetch_blocks": prefetch, "nvme_dir": directory}}
        engine = dtrain.wrap(make_model(), optimizer=None, config=cfg)
        losses = [float(engine.train_step({k: v.to(DEV) for k, v in local_batch(s, 0, 1).items()}))
                  for s in range(10)]
        sha = engine.param_sha256()
        engine.close()
        ref = ref or (sha, losses)
        same = (sha, losses) == ref
        ok &= same
        print(json.dumps({"check": "zo2", "stream": stream, "prefetch_blocks": prefetch, "identical_to_off": same,
                          "last_loss": losses[-1]}), flush=True)
    times: dict[str, list[float]] = {}
    for round_ in range(2):  # interleaved rounds; medians over both
        for stream, prefetch in (("off", 1), ("host", 1), ("host", 0)):
            if DEV == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(0)
            model = GPT(GPTConfig.preset("bench", block_size=256))
            cfg = {"zo2": {**zo, "stream": stream, "prefetch_blocks": prefetch}}
            engine = dtrain.wrap(model, optimizer=None, config=cfg)
            g = torch.Generator().manual_seed(0)
            for step in range(bench_steps + 1):
                x = torch.randint(0, 8192, (8, 257), generator=g).to(DEV)
                sync()
                t = time.perf_counter()
                engine.train_step({"input_ids": x[:, :-1], "labels": x[:, 1:]})
                sync()
                if step:
                    times.setdefault(f"{stream}/prefetch{prefetch}", []).append(time.perf_counter() - t)
            key = f"{stream}/prefetch{prefetch}"
            print(json.dumps({"bench": "zo2", "variant": key, "round": round_,
                              "step_ms_median": 1e3 * statistics.median(times[key]),
                              "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else None}), flush=True)
            engine.close()
    off = statistics.median(times["off/prefetch1"])
    print(json.dumps({"bench": "zo2", "host_over_off": statistics.median(times["host/prefetch1"]) / off,
                      "noprefetch_over_host": statistics.median(times["host/prefetch0"])
                      / statistics.median(times["host/prefetch1"])}), flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/dtrain-zo2-gpu")
    ap.add_argument("--bench-steps", type=int, default=8)
    ap.add_argument("--only", choices=("nccl", "zo2"))
    args = ap.parse_args()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
    os.makedirs(args.dir, exist_ok=True)
    import torch

    global DEV
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    if DEV == "cuda":  # the runtime leaves world 1 without a group; one made here puts Comm on NCCL
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if DEV == "cuda" else "gloo", rank=0, world_size=1)
    print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                      "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}), flush=True)
    ok = True
    if args.only in (None, "nccl"):
        ok &= nccl_checks()
    if args.only in (None, "zo2"):
        ok &= zo2_checks(args.dir, args.bench_steps)
    print("ALL CHECKS PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
