"""CO2 vs DDP vs synchronous local SGD vs the compute-only limit, on 2 namespaced hosts.

    python benchmarks/co2.py                       # 100 Mbit and 1 Gbit, 3 repeats, ~15 min on 2 cores
    python benchmarks/co2.py --rates 100mbit --steps 60 --repeats 1
    python benchmarks/co2.py --ablation-only --rates 1gbit      # co2 + the ablations, one run each

Every variant trains examples/train_gpt.py's model (GPT preset ``small``) on the shipped corpus
with the same data, seed and AdamW, on 2 simulated hosts (network namespaces, ``tc tbf`` on the
link; see dtrain/netns.py), 1 rank each:

* ``ddp``: gradient all-reduce every step across the link;
* ``localsgd``: the CO2 equations without overlap (``co2.overlap = false``): every tau steps the
  ranks stop and wait for the outer all-reduce;
* ``co2``: the outer all-reduce overlapped with the next tau steps;
* ``co2-1chunk``: the same, with the outer all-reduce sent as one collective instead of chunks
  (``CO2Plugin.chunk_bytes = 0``), to show what the chunking buys;
* ``compute``: the same run with communication off (tau larger than the run: no outer sync),
  i.e. the throughput limit;
* once, at the first rate, the ablations (their losses do not depend on the link or on timing,
  so one run each is enough): the three forms of ``co2.penalty`` -- ``co2`` itself ("adaptive",
  the default), ``co2-penalty-off`` ("off") and ``co2-penalty-const`` (the constant
  ``--penalty-constant``, as the authors' released code's ``co2_gap_penalty``) -- and
  ``co2-clip`` (outer momentum 0.5 clipped at 1e-3). ``--ablation-only`` runs just ``co2`` and the
  ablations and writes benchmarks/results/co2_ablation.json.

``python benchmarks/co2.py --sharded --rates 100mbit`` runs instead, on 2 hosts x 2 ranks, co2 over
node-sharded state (every zero kind at ``node``: HSDP inside a host, co2's outer sync across hosts,
each rank syncing only its part; docs/hierarchical.md) as ``co2-sharded``, next to its compute-only
limit ``compute-sharded`` (the same with no outer sync), and writes ``co2_sharded.json``.

``python benchmarks/co2.py --probe`` instead measures, at each rate, how long a 16-byte
all-reduce (the engine's per-step loss reduction) takes while an outer sync of the model's size
is in flight on another process group, with the sync sent whole and in
``CO2Plugin.chunk_bytes`` chunks; it writes benchmarks/results/co2_probe.json. It is mostly
network queueing, so it stays meaningful on a loaded machine.

The timed variants run ``--repeats`` times per rate, interleaved in a rotated order so slow
drifts of a shared machine spread over all of them; tokens/s figures are medians (min and max
are kept). Throughput is tokens/s of wall-clock time on rank 0 over the steps after a warm-up, up to the
end of the last outer sync for every variant (co2's, still in flight after its last step, is
waited for and applied by ``CO2Plugin.flush``, as localsgd's is inside its last step);
losses are the engine's global-batch mean per step (loss-vs-tokens curves), and they are the
same bits in every repeat and at every rate (checked and recorded). Writes
benchmarks/results/co2.json and co2.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


TIMED = ("ddp", "localsgd", "co2", "co2-1chunk", "compute")
ABLATIONS = ("co2-penalty-off", "co2-penalty-const", "co2-clip")
SHARDED = ("co2-sharded", "compute-sharded")  # --sharded: 2 ranks per host, every kind at node
NODE_LEVELS = {"params": "node", "grads": "node", "optim": "node", "backward_params": "node"}


def variants(tau: int, steps: int, penalty_constant: float = 2.0) -> dict[str, dict]:
    """Name -> {"config": dtrain config, "chunk_bytes": CO2Plugin.chunk_bytes override or None}."""
    co2 = {"enabled": True, "local_steps": tau, "outer_lr": 1.0, "outer_momentum": 0.0,
           "penalty": "adaptive", "clip": None, "intra_node_sync": True}
    configs = {"ddp": {}, "localsgd": {"co2": {**co2, "overlap": False}}, "co2": {"co2": co2},
               "co2-1chunk": {"co2": co2}, "compute": {"co2": {**co2, "local_steps": steps + 1}},
               "co2-penalty-off": {"co2": {**co2, "penalty": "off"}},
               "co2-penalty-const": {"co2": {**co2, "penalty": penalty_constant}},
               "co2-clip": {"co2": {**co2, "outer_momentum": 0.5, "clip": 1e-3}},
               "co2-sharded": {"zero": NODE_LEVELS, "co2": co2},
               "compute-sharded": {"zero": NODE_LEVELS, "co2": {**co2, "local_steps": steps + 1}}}
    return {name: {"config": cfg, "chunk_bytes": 0 if name == "co2-1chunk" else None}
            for name, cfg in configs.items()}


# ------------------------------------------------------------------------------ one rank
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "examples"))
    import dtrain
    from dtrain.models import GPT, GPTConfig
    from train_gpt import CORPUS, batch_for

    config = json.loads(args.config)
    # The loss curves come from the metrics stream: the global-batch mean per step. (Under co2,
    # train_step returns the worker's own loss; the global figures are reduced in the background.)
    metrics_path = Path(args.out + ".metrics.jsonl")
    metrics_path.unlink(missing_ok=True)
    config["metrics"] = {**config.get("metrics", {}), "path": str(metrics_path)}
    data = torch.frombuffer(bytearray(Path(CORPUS).read_bytes()), dtype=torch.uint8)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small", vocab_size=256))
    engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.1),
                         config=config)
    co2 = next((p for p in engine.plugins if p.name == "co2"), None)
    if co2 is not None and args.chunk_bytes is not None:
        co2.chunk_bytes = args.chunk_bytes
    rank, world = engine.runtime.rank, engine.runtime.world_size
    block = model.cfg.block_size
    times = []
    start = None
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        engine.train_step(batch_for(data, step, 0, args.batch, block, rank, world))
        times.append(time.perf_counter())
    if co2 is not None:
        co2.flush()  # co2's last outer sync is still in flight: time it, as localsgd's is timed
    end = time.perf_counter()
    wall = end - start
    plugin = co2.metrics() if co2 else {}
    summary = engine.close()
    if rank == 0:
        records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        steps = [r for r in records if "step" in r and "event" not in r and not r.get("summary")]
        losses = [r["loss"] for r in steps]
        # the per-step busiest-rank figures summed: an upper bound, for comparison with the total
        step_sum = {lvl: sum(r["comm_bytes"].get(lvl, 0) for r in steps) for lvl in steps[0]["comm_bytes"]}
        tokens = (args.steps - args.warmup) * args.batch * block
        Path(args.out).write_text(json.dumps({
            "losses": losses, "tokens_per_step": args.batch * block, "wall_s": wall,
            "tokens_per_s": tokens / wall, "comm_bytes": summary.get("comm_bytes_total", {}),
            "comm_bytes_step_sum": step_sum,
            "outer_sync_total_s": plugin.get("outer_sync_total_s"),
            "outer_wait_total_s": plugin.get("outer_wait_total_s"),
            "outer_rounds": plugin.get("outer_rounds"),
            "step_s": (end - times[args.warmup - 1]) / (args.steps - args.warmup),
            "step_times_s": [b - a for a, b in zip(times, times[1:])]}))


def probe_worker(args: argparse.Namespace) -> None:
    """One rank of ``--probe``: small all-reduces timed while a bulk outer all-reduce runs."""
    import statistics
    import threading

    import torch
    import torch.distributed as dist

    from dtrain.plugins.co2 import OUTER_CHUNK_BYTES

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    bulk_group, small_group = dist.new_group([0, 1]), dist.new_group([0, 1])
    numel = 842_496  # GPT "small" (vocab 256): 3.4 MB of fp32
    out = {}
    for chunk in (0, OUTER_CHUNK_BYTES) * args.repeats:
        buf = torch.ones(numel)
        step = chunk // 4 if chunk else numel

        def bulk() -> None:
            for a in range(0, numel, step):
                dist.all_reduce(buf[a:a + step], group=bulk_group)

        dist.barrier()
        start = time.perf_counter()
        thread = threading.Thread(target=bulk)
        thread.start()
        busy = []
        while thread.is_alive():
            x = torch.zeros(2, dtype=torch.float64)
            t = time.perf_counter()
            dist.all_reduce(x, group=small_group)
            busy.append(time.perf_counter() - t)
            time.sleep(0.02)
        thread.join()
        sync_s = time.perf_counter() - start
        idle = []
        for _ in range(10):
            t = time.perf_counter()
            dist.all_reduce(torch.zeros(2, dtype=torch.float64), group=small_group)
            idle.append(time.perf_counter() - t)
        rec = out.setdefault(str(chunk), {"sync_s": [], "small_in_flight_s": [], "small_idle_s": []})
        rec["sync_s"].append(sync_s)
        rec["small_in_flight_s"] += busy
        rec["small_idle_s"] += idle
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({
            k: {"chunk_bytes": int(k), "sync_s_median": statistics.median(v["sync_s"]),
                "small_in_flight_ms": {"median": 1e3 * statistics.median(v["small_in_flight_s"]),
                                       "max": 1e3 * max(v["small_in_flight_s"]), "n": len(v["small_in_flight_s"])},
                "small_idle_ms_median": 1e3 * statistics.median(v["small_idle_s"])} for k, v in out.items()}))
    dist.destroy_process_group()


def probe(args: argparse.Namespace) -> int:
    from _bench_util import machine_info, write_json
    from dtrain import netns

    results: dict = {"machine": machine_info(), "command": "python benchmarks/co2.py --probe",
                     "loadavg_1m_before": os.getloadavg()[0], "rates": {}}
    for k, rate in enumerate(args.rates.split(",")):
        out = Path(args.tmp) / f"probe-{rate}.json"
        with netns.create_hosts(2, rate, prefix="dtrain-p") as hosts:
            argv = [str(Path(__file__).resolve()), "--probe-worker", "--out", str(out), "--repeats", str(args.repeats)]
            codes = netns.wait_all(netns.spawn_ranks(hosts, 1, argv, port=29590 + k), timeout_s=args.timeout_s)
        if codes != [0, 0]:
            raise RuntimeError(f"probe at {rate}: ranks exited with {codes}")
        results["rates"][rate] = json.loads(out.read_text())
        print(rate, json.dumps(results["rates"][rate]), flush=True)
    write_json(RESULTS / "co2_probe.json", results)
    return 0


# ------------------------------------------------------------------------------ driver
def run_variant(hosts, name: str, spec: dict, args: argparse.Namespace, port: int, rep: int) -> dict:
    from dtrain import netns

    out = Path(args.tmp) / f"{hosts.rate}-{name}-{rep}.json"
    argv = [str(Path(__file__).resolve()), "--worker", "--config", json.dumps(spec["config"]), "--out", str(out),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
            "--lr", str(args.lr)]
    if spec["chunk_bytes"] is not None:
        argv += ["--chunk-bytes", str(spec["chunk_bytes"])]
    load_before = os.getloadavg()[0]
    nproc = 2 if name in SHARDED else 1
    procs = netns.spawn_ranks(hosts, nproc, argv, port=port)
    codes = netns.wait_all(procs, timeout_s=args.timeout_s)
    if codes != [0] * (2 * nproc):
        raise RuntimeError(f"{name} at {hosts.rate}: ranks exited with {codes}")
    run = json.loads(out.read_text())
    run["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--chunk-bytes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help="measure inner-collective latency behind the outer sync")
    p.add_argument("--rates", default="100mbit,1gbit")
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--warmup", type=int, default=8)
    # 16: on the idle machine a step of this model takes ~36 ms, so 8 steps (0.29 s) are shorter
    # than the outer sync at 100 Mbit (~0.31 s) and no overlap could hide it; at 16 they are not.
    p.add_argument("--tau", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences of 128 tokens)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--repeats", type=int, default=3, help="runs of each timed variant per rate")
    p.add_argument("--penalty-constant", type=float, default=2.0, help="co2.penalty of co2-penalty-const")
    p.add_argument("--ablation-only", action="store_true",
                   help="only co2 and the ablations, once each at the first rate (loss at equal tokens)")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--results", default="co2", help="stem of the results files under benchmarks/results")
    p.add_argument("--no-ablations", action="store_true", help="only the timed variants")
    p.add_argument("--sharded", action="store_true",
                   help="only co2 over node-sharded state vs its compute-only limit, 2 ranks per host")
    p.add_argument("--tmp", default="/tmp/dtrain-bench-co2")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.probe_worker:
        sys.path.insert(0, str(ROOT))
        probe_worker(args)
        return 0

    sys.path.insert(0, str(HERE))
    from _bench_util import machine_info, rotated_schedule, write_json
    from dtrain import netns

    reason = netns.unavailable_reason()
    if reason:
        print(f"benchmarks/co2.py needs the slow-link harness: {reason}", file=sys.stderr)
        return 2
    os.makedirs(args.tmp, exist_ok=True)
    if args.probe:
        return probe(args)
    results: dict = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items()
                                                         if k not in ("worker", "config", "out", "chunk_bytes", "probe", "probe_worker")},
                     "command": "python benchmarks/co2.py " + " ".join(argv or sys.argv[1:]), "rates": {}}
    specs = variants(args.tau, args.steps, args.penalty_constant)
    port = 29600
    if args.ablation_only:
        return ablation(args, specs, results)
    if args.sharded:
        return sharded(args, specs, results)
    for i, rate in enumerate(args.rates.split(",")):
        runs: dict[str, list[dict]] = {}
        ablations = ABLATIONS if i == 0 and not args.no_ablations else ()
        schedule = rotated_schedule(TIMED, args.repeats) + [(0, name) for name in ablations]
        with netns.create_hosts(2, rate, prefix="dtrain-b") as hosts:
            port = run_schedule(hosts, rate, schedule, specs, args, port, runs)
        results["rates"][rate] = {"runs": {name: _summary(rs, args) for name, rs in runs.items()}}
        results["rates"][rate]["ratios"] = _ratios(results["rates"][rate]["runs"])
    results["losses_identical_across_rates"] = all(
        _same_losses([v["runs"][n]["losses"] for v in results["rates"].values()]) for n in TIMED)
    write_json(RESULTS / f"{args.results}.json", results)
    _plot(results, RESULTS / f"{args.results}.png")
    print(json.dumps({r: v["ratios"] for r, v in results["rates"].items()}, indent=2))
    return 0


def ablation(args: argparse.Namespace, specs: dict[str, dict], results: dict) -> int:
    """co2 and each ablation once at the first rate: loss at equal tokens (timing-independent)."""
    from _bench_util import write_json
    from dtrain import netns

    rate = args.rates.split(",")[0]
    runs = {}
    with netns.create_hosts(2, rate, prefix="dtrain-a") as hosts:
        for k, name in enumerate(("co2", *ABLATIONS)):
            runs[name] = run_variant(hosts, name, specs[name], args, 29700 + k, 0)
            print(f"{name:>18}: final loss {runs[name]['losses'][-1]:.4f}  mean of last 8 "
                  f"{_tail_loss(runs[name]):.4f}  load {runs[name]['loadavg_1m'][0]:.1f}", flush=True)
    results["rate"] = rate
    results["runs"] = {name: {"config": specs[name]["config"], "losses": r["losses"],
                              "tail_loss": _tail_loss(r), "loadavg_1m": r["loadavg_1m"]} for name, r in runs.items()}
    results["loss_vs_co2"] = {name: _tail_loss(runs[name]) / _tail_loss(runs["co2"]) - 1 for name in ABLATIONS}
    write_json(RESULTS / "co2_ablation.json", results)
    print(json.dumps(results["loss_vs_co2"], indent=2))
    return 0



def run_schedule(hosts: Any, rate: str, schedule: list[tuple[int, str]], specs: dict, args: argparse.Namespace,
                 port: int, runs: dict[str, list[dict]]) -> int:
    """Run ``schedule`` ((repeat, variant) pairs) on ``hosts``, appending to ``runs``; returns the last port used."""
    for rep, name in schedule:
        port += 1
        run = run_variant(hosts, name, specs[name], args, port, rep)
        runs.setdefault(name, []).append(run)
        print(f"{rate:>8} {name:>16} #{rep}: {run['tokens_per_s']:8.0f} tok/s  final loss "
              f"{run['losses'][-1]:.4f}  outer_wait {run['outer_wait_total_s']}  "
              f"load {run['loadavg_1m'][0]:.1f}", flush=True)
    return port

def sharded(args: argparse.Namespace, specs: dict[str, dict], results: dict) -> int:
    """co2-sharded and compute-sharded, interleaved, at each rate (2 hosts x 2 ranks)."""
    import statistics

    from _bench_util import rotated_schedule, write_json
    from dtrain import netns

    port = 29650
    for rate in args.rates.split(","):
        runs: dict[str, list[dict]] = {}
        with netns.create_hosts(2, rate, prefix="dtrain-s") as hosts:
            port = run_schedule(hosts, rate, rotated_schedule(SHARDED, args.repeats), specs, args, port, runs)
        summary = {name: _summary(rs, args) for name, rs in runs.items()}
        co2, compute = summary["co2-sharded"], summary["compute-sharded"]
        ratios = {"co2_sharded_vs_compute": co2["tokens_per_s"]["median"] / compute["tokens_per_s"]["median"],
                  "paired_co2_sharded_vs_compute": statistics.median(
                      a / b for a, b in zip(co2["tokens_per_s_all"], compute["tokens_per_s_all"])),
                  "co2_outer_wait_s": co2["outer_wait_total_s"]["median"],
                  "co2_outer_sync_s": co2["outer_sync_total_s"]["median"]}
        results["rates"][rate] = {"runs": summary, "ratios": ratios}
        print(rate, json.dumps(ratios, indent=2), flush=True)
    write_json(RESULTS / f"{args.results}_sharded.json", results)
    return 0


def _same_losses(curves: list[list[float]]) -> bool:
    return all(c == curves[0] for c in curves)


def _summary(runs: list[dict], args: argparse.Namespace) -> dict:
    """Medians (with min/max) of the timings of ``runs``; the loss curve, which every run shares."""
    import statistics

    def stats(values: list[float | None]) -> dict:
        vals = [v for v in values if v is not None]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)} if vals else None

    keys = ("tokens_per_s", "step_s", "wall_s", "outer_sync_total_s", "outer_wait_total_s")
    out = {k: stats([r.get(k) for r in runs]) for k in keys}
    # step time by position in the round (1 .. tau; tau = the boundary step: apply + send)
    tau = args.tau
    by_pos: dict[int, list[float]] = {}
    for r in runs:
        for step, t in enumerate(r["step_times_s"][args.warmup:], start=args.warmup + 2):
            by_pos.setdefault((step - 1) % tau + 1, []).append(t)
    out["step_s_by_round_position"] = {str(k): statistics.median(v) for k, v in sorted(by_pos.items())}
    out.update(losses=runs[0]["losses"], losses_identical_across_repeats=_same_losses([r["losses"] for r in runs]),
               tokens_per_step=runs[0]["tokens_per_step"], comm_bytes=runs[0]["comm_bytes"],
               comm_bytes_step_sum=runs[0].get("comm_bytes_step_sum"),
               outer_rounds=runs[0]["outer_rounds"], repeats=len(runs),
               tokens_per_s_all=[r["tokens_per_s"] for r in runs], loadavg_1m=[r["loadavg_1m"] for r in runs])
    return out


def _tail_loss(run: dict, n: int = 8) -> float:
    return sum(run["losses"][-n:]) / n


def _ratios(runs: dict) -> dict:
    """Ratios of the median tokens/s, and ``paired_*``: the median over passes of the ratio within
    one pass (the variants of a pass ran back to back, so a slow spell of the machine hits both)."""
    import statistics

    tps = {k: v["tokens_per_s"]["median"] for k, v in runs.items() if v["tokens_per_s"]}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(runs[a]["tokens_per_s_all"], runs[b]["tokens_per_s_all"]))

    out = {"co2_vs_compute": tps["co2"] / tps["compute"], "co2_vs_ddp": tps["co2"] / tps["ddp"],
           "compute_vs_ddp": tps["compute"] / tps["ddp"], "localsgd_vs_ddp": tps["localsgd"] / tps["ddp"],
           "co2_1chunk_vs_compute": tps["co2-1chunk"] / tps["compute"],
           "paired_co2_vs_compute": paired("co2", "compute"), "paired_co2_vs_ddp": paired("co2", "ddp"),
           "paired_compute_vs_ddp": paired("compute", "ddp"),
           "paired_co2_1chunk_vs_compute": paired("co2-1chunk", "compute"),
           "loss_co2_vs_ddp": _tail_loss(runs["co2"]) / _tail_loss(runs["ddp"]) - 1,
           "co2_outer_wait_s": runs["co2"]["outer_wait_total_s"]["median"],
           "co2_outer_sync_s": runs["co2"]["outer_sync_total_s"]["median"],
           "localsgd_outer_wait_s": runs["localsgd"]["outer_wait_total_s"]["median"]}
    for k in ABLATIONS:
        if k in runs:
            out[f"loss_{k}_vs_co2"] = _tail_loss(runs[k]) / _tail_loss(runs["co2"]) - 1
    return out


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(results["rates"])
    fig, axes = plt.subplots(2, len(rates), figsize=(6.5 * len(rates), 8.5), squeeze=False)
    for j, rate in enumerate(rates):
        runs = results["rates"][rate]["runs"]
        ax = axes[0][j]
        names = [n for n in TIMED if n in runs]
        med = [runs[n]["tokens_per_s"]["median"] for n in names]
        err = [[m - runs[n]["tokens_per_s"]["min"] for n, m in zip(names, med)],
               [runs[n]["tokens_per_s"]["max"] - m for n, m in zip(names, med)]]
        ax.bar(names, med, yerr=err, capsize=4, color="tab:blue")
        ax.set_title(f"{rate}: tokens/s, median of {runs['co2']['repeats']} (bars: min..max)")
        ax.tick_params(axis="x", rotation=30)
        ax = axes[1][j]
        for n in runs:
            if n == "co2-1chunk":
                continue  # the same bits as co2's curve
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
