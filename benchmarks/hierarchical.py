"""Per-kind zero levels on 2 namespaced hosts x 2 ranks: flat ZeRO-3, HSDP, hpZ, frontier3, the planner's pick.

    python benchmarks/hierarchical.py                      # 1 Gbit and 100 Mbit, 3 repeats
    python benchmarks/hierarchical.py --quick              # 1 Gbit, 1 repeat, 6 steps

Every variant trains examples/train_gpt.py's model (GPT preset ``small``, vocab 256) on the shipped
corpus with the same data, seed and AdamW on 2 simulated hosts (network namespaces, ``tc tbf`` on
the inter-host link; dtrain/netns.py) of 2 ranks each (``DTRAIN_NODES=2``), so ``node`` groups stay
inside a host and ``global`` ones cross the link. Variants (docs/hierarchical.md):

* ``zero3``: flat ZeRO-3 (every kind at ``global``);
* ``hsdp``: every kind at ``node`` (replicated across hosts);
* ``hpz``: ZeRO-3 plus a node-level backward copy; ``hpz-int8``: the same with int8 all-gathers;
* ``frontier3``: params and grads at ``node``, optimizer state at ``global`` (there is no level
  below the node here, so its backward copy is at ``node``);
* ``auto``: ``zero.preset = "auto"`` (the planner's choice at start-up).

DeepSpeed ZeRO-3 / ZeRO++ and FSDP2 HSDP are not run by this script (not done this session).
Figures per variant: median step time (after a warm-up), bytes per step per level from rank 0's
``comm_bytes``, peak RSS, state bytes per kind, the final loss. Variants are interleaved in a
rotated order, repeated, and medians reported, because the machine is shared. Writes
benchmarks/results/hierarchical.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

VARIANTS = {
    "zero3": {"stage": 3},
    "hsdp": {"preset": "hsdp"},
    "hpz": {"preset": "hpz"},
    "hpz-int8": {"preset": "hpz", "gather_dtype": "int8"},
    "frontier3": {"preset": "frontier3"},
    "auto": {"preset": "auto"},
}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(HERE))
    import dtrain
    from _bench_util import peak_rss_bytes
    from dtrain.models import GPT, GPTConfig
    from train_gpt import CORPUS, batch_for

    data = torch.frombuffer(bytearray(Path(CORPUS).read_bytes()), dtype=torch.uint8)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small", vocab_size=256))
    engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1),
                         config={"zero": json.loads(args.zero)})
    rank, world = engine.runtime.rank, engine.runtime.world_size
    times, losses, before = [], [], None
    for step in range(args.steps):
        if step == args.warmup:
            before = dict(engine.comm.bytes_sent)
        start = time.perf_counter()
        losses.append(float(engine.train_step(batch_for(data, step, 0, args.batch, model.cfg.block_size, rank, world))))
        times.append(time.perf_counter() - start)
    measured = args.steps - args.warmup
    per_step = {k: (v - before.get(k, 0)) / measured for k, v in engine.comm.bytes_sent.items()}
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "step_s": statistics.median(times[args.warmup:]), "losses": losses, "bytes_per_step": per_step,
            "peak_rss_bytes": peak_rss_bytes(), "state_bytes": engine.state_bytes(),
            "levels": engine.layout.levels.as_dict()}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rates", default="1gbit,100mbit")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences of 128 tokens)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 Gbit, 1 repeat, 6 steps")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--tmp", default="/tmp/dtrain-bench-hier")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.rates, args.repeats, args.steps, args.warmup = args.rates.split(",")[0], 1, 6, 2
    sys.path.insert(0, str(HERE))
    from _bench_util import machine_info, rotated_schedule, write_json
    from dtrain import netns

    reason = netns.unavailable_reason()
    if reason:
        print(f"benchmarks/hierarchical.py needs the slow-link harness: {reason}", file=sys.stderr)
        return 2
    os.makedirs(args.tmp, exist_ok=True)
    names = args.variants.split(",")
    results: dict = {"machine": machine_info(), "command": "python benchmarks/hierarchical.py " + " ".join(argv or sys.argv[1:]),
                     "args": {k: v for k, v in vars(args).items() if k not in ("worker", "zero", "out")}, "rates": {}}
    port = 29700
    for rate in args.rates.split(","):
        runs: dict[str, list[dict]] = {}
        with netns.create_hosts(2, rate, prefix="dtrain-h") as hosts:
            for rep, name in rotated_schedule(names, args.repeats):
                port += 1
                out = Path(args.tmp) / f"{rate}-{name}-{rep}.json"
                cmd = [str(Path(__file__).resolve()), "--worker", "--zero", json.dumps(VARIANTS[name]), "--out", str(out),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
                load = os.getloadavg()[0]
                codes = netns.wait_all(netns.spawn_ranks(hosts, 2, cmd, port=port), timeout_s=args.timeout_s)
                if codes != [0] * 4:
                    raise RuntimeError(f"{name} at {rate}: ranks exited with {codes}")
                run = json.loads(out.read_text())
                run["loadavg_1m"] = round(load, 2)
                runs.setdefault(name, []).append(run)
                print(f"{rate:>8} {name:>10} #{rep}: step {run['step_s'] * 1e3:8.1f} ms  "
                      f"global {run['bytes_per_step'].get('global', 0) / 1e6:7.2f} MB/step  load {load:.1f}", flush=True)
        summary = {}
        for name, rs in runs.items():
            summary[name] = {"step_s_median": statistics.median(r["step_s"] for r in rs),
                             "step_s_all": [r["step_s"] for r in rs], "bytes_per_step": rs[0]["bytes_per_step"],
                             "peak_rss_bytes": max(r["peak_rss_bytes"] or 0 for r in rs),
                             "state_bytes": rs[0]["state_bytes"], "levels": rs[0]["levels"],
                             "final_loss": rs[0]["losses"][-1], "loadavg_1m": [r["loadavg_1m"] for r in rs]}
        base = summary.get("zero3")
        if base:
            for s in summary.values():
                s["speedup_vs_zero3"] = base["step_s_median"] / s["step_s_median"]
                s["global_bytes_vs_zero3"] = (s["bytes_per_step"].get("global", 0) /
                                              max(base["bytes_per_step"].get("global", 1), 1))
        results["rates"][rate] = summary
    write_json(RESULTS / ("hierarchical_quick.json" if args.quick else "hierarchical.json"), results)
    for rate, summary in results["rates"].items():
        for name, s in summary.items():
            print(f"{rate:>8} {name:>10}: {s['step_s_median'] * 1e3:8.1f} ms/step  x{s.get('speedup_vs_zero3', 0):.2f} "
                  f"global bytes x{s.get('global_bytes_vs_zero3', 0):.2f}  loss {s['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
