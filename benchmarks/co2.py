"""CO2 vs DDP vs synchronous local SGD vs the compute-only limit, on 2 namespaced hosts.

    python benchmarks/co2.py                       # 100 Mbit and 1 Gbit, ~6 minutes on 2 cores
    python benchmarks/co2.py --rates 100mbit --steps 60

Every variant trains examples/train_gpt.py's model (GPT preset ``small``) on the shipped corpus
with the same data, seed and AdamW, on 2 simulated hosts (network namespaces, ``tc tbf`` on the
link; see dtrain/netns.py), 1 rank each:

* ``ddp``: gradient all-reduce every step across the link;
* ``localsgd``: the CO2 equations without overlap (``co2.overlap = false``): every tau steps the
  ranks stop and wait for the outer all-reduce;
* ``co2``: the outer all-reduce overlapped with the next tau steps;
* ``compute``: the same run with communication off (tau larger than the run: no outer sync),
  i.e. the throughput limit;
* at the first rate also the ablations ``co2-nopenalty`` and ``co2-clip``.

Throughput is tokens/s of wall-clock time on rank 0 over the steps after a warm-up; losses are
the engine's global-batch mean per step (loss-vs-tokens curves). Writes
benchmarks/results/co2.json and co2.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def variants(tau: int, steps: int, first_rate: bool) -> dict[str, dict]:
    co2 = {"enabled": True, "local_steps": tau, "outer_lr": 1.0, "outer_momentum": 0.0,
           "penalty": True, "clip": None, "intra_node_sync": True}
    out = {"ddp": {}, "localsgd": {"co2": {**co2, "overlap": False}}, "co2": {"co2": co2},
           "compute": {"co2": {**co2, "local_steps": steps + 1}}}
    if first_rate:
        out["co2-nopenalty"] = {"co2": {**co2, "penalty": False}}
        out["co2-clip"] = {"co2": {**co2, "outer_momentum": 0.5, "clip": 1e-3}}
    return out


# ------------------------------------------------------------------------------ one rank
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "examples"))
    import dtrain
    from dtrain.models import GPT, GPTConfig
    from train_gpt import CORPUS, batch_for

    config = json.loads(args.config)
    data = torch.frombuffer(bytearray(Path(CORPUS).read_bytes()), dtype=torch.uint8)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small", vocab_size=256))
    engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.1),
                         config=config)
    rank, world = engine.runtime.rank, engine.runtime.world_size
    block = model.cfg.block_size
    losses, times = [], []
    start = None
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        losses.append(float(engine.train_step(batch_for(data, step, 0, args.batch, block, rank, world))))
        times.append(time.perf_counter())
    wall = time.perf_counter() - start
    co2 = next((p for p in engine.plugins if p.name == "co2"), None)
    plugin = co2.metrics() if co2 else {}
    summary = engine.close()
    if rank == 0:
        tokens = (args.steps - args.warmup) * args.batch * block
        Path(args.out).write_text(json.dumps({
            "losses": losses, "tokens_per_step": args.batch * block, "wall_s": wall,
            "tokens_per_s": tokens / wall, "comm_bytes": summary.get("comm_bytes_total", {}),
            "outer_sync_total_s": plugin.get("outer_sync_total_s"),
            "outer_wait_total_s": plugin.get("outer_wait_total_s"),
            "outer_rounds": plugin.get("outer_rounds"),
            "step_s": (times[-1] - times[args.warmup - 1]) / (args.steps - args.warmup)}))


# ------------------------------------------------------------------------------ driver
def run_variant(hosts, name: str, cfg: dict, args: argparse.Namespace, port: int) -> dict:
    from dtrain import netns

    out = Path(args.tmp) / f"{hosts.rate}-{name}.json"
    argv = [str(Path(__file__).resolve()), "--worker", "--config", json.dumps(cfg), "--out", str(out),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
            "--lr", str(args.lr)]
    procs = netns.spawn_ranks(hosts, 1, argv, port=port)
    codes = netns.wait_all(procs, timeout_s=args.timeout_s)
    if codes != [0, 0]:
        raise RuntimeError(f"{name} at {hosts.rate}: ranks exited with {codes}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rates", default="100mbit,1gbit")
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--tau", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences of 128 tokens)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--tmp", default="/tmp/dtrain-bench-co2")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    sys.path.insert(0, str(HERE))
    from _bench_util import machine_info, write_json
    from dtrain import netns

    reason = netns.unavailable_reason()
    if reason:
        print(f"benchmarks/co2.py needs the slow-link harness: {reason}", file=sys.stderr)
        return 2
    os.makedirs(args.tmp, exist_ok=True)
    results: dict = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items()
                                                         if k not in ("worker", "config", "out")},
                     "command": "python benchmarks/co2.py " + " ".join(argv or sys.argv[1:]), "rates": {}}
    port = 29600
    for i, rate in enumerate(args.rates.split(",")):
        with netns.create_hosts(2, rate, prefix="dtrain-b") as hosts:
            runs = {}
            for name, cfg in variants(args.tau, args.steps, i == 0).items():
                port += 1
                runs[name] = run_variant(hosts, name, cfg, args, port)
                print(f"{rate:>8} {name:>14}: {runs[name]['tokens_per_s']:8.0f} tok/s  "
                      f"final loss {runs[name]['losses'][-1]:.4f}  "
                      f"outer_wait {runs[name]['outer_wait_total_s']}", flush=True)
        results["rates"][rate] = {"runs": runs, "ratios": _ratios(runs, args.warmup)}
    write_json(RESULTS / "co2.json", results)
    _plot(results, RESULTS / "co2.png")
    print(json.dumps({r: v["ratios"] for r, v in results["rates"].items()}, indent=2))
    return 0


def _tail_loss(run: dict, n: int = 8) -> float:
    return sum(run["losses"][-n:]) / n


def _ratios(runs: dict, warmup: int) -> dict:
    tps = {k: v["tokens_per_s"] for k, v in runs.items()}
    out = {"co2_vs_compute": tps["co2"] / tps["compute"], "co2_vs_ddp": tps["co2"] / tps["ddp"],
           "localsgd_vs_ddp": tps["localsgd"] / tps["ddp"],
           "loss_co2_vs_ddp": _tail_loss(runs["co2"]) / _tail_loss(runs["ddp"]) - 1,
           "co2_outer_wait_s": runs["co2"]["outer_wait_total_s"],
           "co2_outer_sync_s": runs["co2"]["outer_sync_total_s"],
           "localsgd_outer_wait_s": runs["localsgd"]["outer_wait_total_s"]}
    for k in ("co2-nopenalty", "co2-clip"):
        if k in runs:
            out[f"loss_{k}_vs_co2"] = _tail_loss(runs[k]) / _tail_loss(runs["co2"]) - 1
    return out


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(results["rates"])
    fig, axes = plt.subplots(2, len(rates), figsize=(6 * len(rates), 8), squeeze=False)
    for j, rate in enumerate(rates):
        runs = results["rates"][rate]["runs"]
        ax = axes[0][j]
        names = list(runs)
        ax.bar(names, [runs[n]["tokens_per_s"] for n in names], color="tab:blue")
        ax.set_title(f"{rate}: tokens/s (2 hosts)")
        ax.tick_params(axis="x", rotation=30)
        ax = axes[1][j]
        for n in names:
            tok = runs[n]["tokens_per_step"]
            ax.plot([tok * (i + 1) for i in range(len(runs[n]["losses"]))], runs[n]["losses"], label=n, lw=1)
        ax.set_xlabel("tokens (global)")
        ax.set_ylabel("loss")
        ax.set_title(f"{rate}: loss vs tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
