"""zo2 (zeroth-order, block streaming, data-parallel by two losses) against MeZO and first-order AdamW.

    python benchmarks/zo2.py                  # 8-block GPT, 3 repeats, + world 2 at 100 Mbit (~10 min idle)
    python benchmarks/zo2.py --quick          # small model, 1 repeat, a minute or two
    python benchmarks/zo2.py --no-net         # skip the network-namespace part

Local variants (one process, world 1, same model, data and seed):

* ``mezo``: plain MeZO in memory, no dtrain (in-place +eps z, -2 eps z, +eps z, update): the limit
  for step time and memory (parameters only);
* ``zo2-off``: dtrain zo2, everything on the device (parameters + one saved copy during a step);
* ``zo2-host``: blocks streamed from host memory with ``prefetch_blocks = 1``;
* ``zo2-host-noprefetch``: the same with ``prefetch_blocks = 0`` (each block prepared when needed);
* ``zo2-nvme``: blocks streamed from zo2's aligned block file (tmpfs or disk: see ``--nvme-dir``);
* ``adamw``: first-order AdamW under dtrain's DDP layout (world 1).

Reported per variant: median step time after a warm-up (wall clock, and the process's CPU seconds
per step, which a loaded machine disturbs less), peak RSS of the process, the parameter
bytes resident on the device at the peak (zo2 streaming: the plugin's measured figure; the others:
what they hold by construction), and bytes moved per step between tiers.

Network part (``--rate``, default 100mbit; root and iproute2 needed, see dtrain/netns.py): world 2 on
2 namespaced hosts, 1 rank each, ``zo2-off`` and ``adamw`` (DDP), each at ``--rate`` and at 10 Gbit
(the link-free limit of the same placement); the ratio of the two is the throughput kept over the
slow link. Variants are interleaved over ``--repeats`` rounds (rotated) and figures are medians.
Writes benchmarks/results/zo2.json (zo2_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
LOCAL = ("mezo", "zo2-off", "zo2-host", "zo2-host-noprefetch", "zo2-nvme", "adamw")
NET = ("zo2-off", "adamw")
ZO = {"enabled": True, "lr": 1e-4, "eps": 1e-3, "seed": 0}


def model_config(quick: bool) -> dict:
    if quick:
        return dict(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)
    return dict(vocab_size=256, block_size=128, n_layer=8, n_head=4, n_embd=256)


def variant_config(name: str, nvme_dir: str) -> dict:
    return {"mezo": {}, "adamw": {},
            "zo2-off": {"zo2": {**ZO, "stream": "off"}},
            "zo2-host": {"zo2": {**ZO, "stream": "host", "prefetch_blocks": 1}},
            "zo2-host-noprefetch": {"zo2": {**ZO, "stream": "host", "prefetch_blocks": 0}},
            "zo2-nvme": {"zo2": {**ZO, "stream": "nvme", "prefetch_blocks": 1, "nvme_dir": nvme_dir}}}[name]


# ------------------------------------------------------------------------------ one rank
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(HERE))
    from _bench_util import peak_rss_bytes

    import dtrain
    from dtrain.models import GPT, GPTConfig
    from train_gpt import CORPUS, batch_for

    data = torch.frombuffer(bytearray(Path(CORPUS).read_bytes()), dtype=torch.uint8)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_config(args.quick)))
    block = model.cfg.block_size
    n_params = sum(p.numel() for p in model.parameters())
    times, losses, extra = [], [], {}
    if args.variant == "mezo":
        rank, world = 0, 1
        run_step = mezo_stepper(model)
    else:
        config = variant_config(args.variant, args.nvme_dir)
        factory = None if "zo2" in config else (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1))
        engine = dtrain.wrap(model, optimizer=factory, config=config)
        rank, world = engine.runtime.rank, engine.runtime.world_size
        run_step = engine.train_step
    sent, cpu = [], []
    for step in range(args.steps):
        batch = batch_for(data, step, 0, args.batch, block, rank, world)
        before = sum(engine.comm.bytes_sent.values()) if args.variant != "mezo" else 0
        start, start_cpu = time.perf_counter(), time.process_time()
        losses.append(float(run_step(batch)))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        sent.append((sum(engine.comm.bytes_sent.values()) if args.variant != "mezo" else 0) - before)
    if args.variant != "mezo":
        extra = {k: v for k, v in engine.strategy.metrics().items() if k.startswith("zo2_")}
        engine.close()
    param_bytes = n_params * 4
    resident = {"mezo": param_bytes, "zo2-off": 2 * param_bytes, "adamw": 4 * param_bytes}.get(
        args.variant, extra.get("zo2_resident_param_bytes_peak"))
    steady = times[args.warmup:]
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "variant": args.variant, "world": world, "params": n_params, "param_bytes": param_bytes,
            "step_s": statistics.median(steady), "step_times_s": times, "losses": losses,
            "cpu_s_per_step": statistics.median(cpu[args.warmup:]),
            "tokens_per_s": args.batch * block / statistics.median(steady),
            "peak_rss_bytes": peak_rss_bytes(), "resident_param_bytes": resident,
            "bytes_moved_per_step": extra.get("zo2_bytes_moved", 0.0),
            "comm_bytes_per_step": statistics.median(sent[1:]) if len(sent) > 1 else sent[0],
            "zo2": extra}))


def mezo_stepper(model):
    """MeZO as its authors run it: in-place perturbation and restore, eval mode, no extra copy."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    state = {"step": 0}

    def perturb(seed: int, scale: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen), alpha=scale)

    @torch.no_grad()
    def step(batch) -> float:
        seed, eps, lr = state["step"], ZO["eps"], ZO["lr"]
        perturb(seed, eps)
        plus = float(model(**batch))
        perturb(seed, -2 * eps)
        minus = float(model(**batch))
        perturb(seed, eps)
        g = (plus - minus) / (2 * eps)
        perturb(seed, -lr * g)
        state["step"] += 1
        return (plus + minus) / 2

    return step


# ------------------------------------------------------------------------------ driver
def _worker_argv(args: argparse.Namespace, name: str, out: Path) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--worker", "--variant", name, "--out", str(out), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--nvme-dir", args.nvme_dir]
    return argv + (["--quick"] if args.quick else [])


def run_local(args: argparse.Namespace, name: str, rep: int) -> dict:
    out = Path(args.tmp) / f"local-{name}-{rep}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, *_worker_argv(args, name, out)], env=env, capture_output=True,
                          text=True, timeout=args.timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    run = json.loads(out.read_text())
    run["loadavg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return run


def run_net(args: argparse.Namespace, hosts, name: str, rep: int, port: int) -> dict:
    from dtrain import netns

    out = Path(args.tmp) / f"net-{hosts.rate}-{name}-{rep}.json"
    procs = netns.spawn_ranks(hosts, 1, _worker_argv(args, name, out), port=port,
                              env={"PYTHONPATH": str(ROOT)})
    codes = netns.wait_all(procs, timeout_s=args.timeout_s)
    if codes != [0, 0]:
        raise RuntimeError(f"{name} at {hosts.rate}: ranks exited with {codes}")
    return json.loads(out.read_text())


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small model, few steps, one repeat")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--no-net", action="store_true")
    p.add_argument("--nvme-dir", default="/tmp/dtrain-bench-zo2/nvme")
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--tmp", default="/tmp/dtrain-bench-zo2")
    args = p.parse_args(argv)
    args.steps = args.steps or (6 if args.quick else 12)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        worker(args)
        return 0
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from _bench_util import machine_info, rotated_schedule, safe_ratio, write_json

    os.makedirs(args.tmp, exist_ok=True)
    results: dict = {"machine": machine_info(), "command": "python benchmarks/zo2.py " + " ".join(argv or sys.argv[1:]),
                     "model": model_config(args.quick), "args": {k: v for k, v in vars(args).items()
                                                                if k not in ("worker", "variant", "out")}}
    local: dict[str, list[dict]] = {}
    for rep, name in rotated_schedule(LOCAL, args.repeats):
        run = run_local(args, name, rep)
        local.setdefault(name, []).append(run)
        print(f"local {name:>20} #{rep}: step {run['step_s'] * 1e3:8.1f} ms  rss {run['peak_rss_bytes'] / 2**20:7.1f} MiB  "
              f"resident params {(run['resident_param_bytes'] or 0) / 2**20:6.2f} MiB  "
              f"moved {run['bytes_moved_per_step'] / 2**20:6.2f} MiB/step  load {run['loadavg_1m'][0]:.1f}", flush=True)
    summary = {name: {key: _median(runs, key) for key in ("step_s", "cpu_s_per_step", "tokens_per_s", "peak_rss_bytes",
                                                           "resident_param_bytes", "bytes_moved_per_step")}
               | {"step_s_all": [r["step_s"] for r in runs], "zo2": runs[0]["zo2"], "params": runs[0]["params"]}
               for name, runs in local.items()}
    results["local"] = summary
    block_bytes = summary["zo2-host"]["zo2"].get("zo2_block_bytes")
    results["targets"] = {
        "host_over_off_step_time": safe_ratio(summary["zo2-host"]["step_s"], summary["zo2-off"]["step_s"]),
        "noprefetch_over_host_step_time": safe_ratio(summary["zo2-host-noprefetch"]["step_s"], summary["zo2-host"]["step_s"]),
        "host_block_bytes_peak_in_blocks": safe_ratio(summary["zo2-host"]["zo2"].get("zo2_block_bytes_peak"), block_bytes),
        "off_over_mezo_step_time": safe_ratio(summary["zo2-off"]["step_s"], summary["mezo"]["step_s"]),
    }
    same = all(r["losses"] == local["zo2-off"][0]["losses"] for n in ("zo2-off", "zo2-host", "zo2-host-noprefetch", "zo2-nvme")
               for r in local[n])
    results["streaming_losses_identical_to_off"] = same
    if not args.no_net:
        from dtrain import netns

        reason = netns.unavailable_reason()
        if reason:
            results["net"] = {"skipped": reason}
        else:
            net: dict[str, dict[str, list[dict]]] = {}
            port = 29700
            for rate in (args.rate, "10gbit"):
                with netns.create_hosts(2, rate, prefix="dtrain-z") as hosts:
                    for rep, name in rotated_schedule(NET, args.repeats):
                        port += 1
                        run = run_net(args, hosts, name, rep, port)
                        net.setdefault(rate, {}).setdefault(name, []).append(run)
                        print(f"{rate:>8} {name:>8} #{rep}: step {run['step_s'] * 1e3:8.1f} ms  "
                              f"comm {run['comm_bytes_per_step']:.0f} B/step", flush=True)
            results["net"] = {rate: {name: {"step_s": _median(runs, "step_s"), "tokens_per_s": _median(runs, "tokens_per_s"),
                                            "comm_bytes_per_step": _median(runs, "comm_bytes_per_step"),
                                            "step_s_all": [r["step_s"] for r in runs]}
                                     for name, runs in by.items()} for rate, by in net.items()}
            results["targets"]["zo2_throughput_at_rate_over_link_free"] = safe_ratio(
                results["net"][args.rate]["zo2-off"]["tokens_per_s"], results["net"]["10gbit"]["zo2-off"]["tokens_per_s"])
            results["targets"]["ddp_throughput_at_rate_over_link_free"] = safe_ratio(
                results["net"][args.rate]["adamw"]["tokens_per_s"], results["net"]["10gbit"]["adamw"]["tokens_per_s"])
    path = write_json(RESULTS / ("zo2_quick.json" if args.quick else "zo2.json"), results)
    print(json.dumps(results["targets"], indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
