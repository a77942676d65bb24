"""FlexSP runtime vs static Ulysses degrees on variable-length batches (dtrain/seqpar).

    python benchmarks/seqpar.py [--nodes 2 --net 1gbit] [--repeats 3] [--steps 4] [--quick]
                                [--width 128 --batch 16 --max-tokens 512 --solver greedy]

4 ranks: by default 2 simulated hosts x 2 ranks (network namespaces joined by a ``tc tbf`` link of
``--net``, dtrain/netns.py; root needed), ``--nodes 1`` for 4 ranks on one host (loopback). Each
repeat launches one rank group per length mix (``longtail``, ``lognormal`` of
dtrain/seqpar/lengths.py; mixes alternate within a repeat). The group trains the example GPT
(``small`` preset with ``--max-len`` positions, AdamW) under ``seqpar.max_tokens_per_rank =
--max-tokens`` (default 512: a sequence of 1025-2048 tokens needs a group of 4, so a static degree
must be 4 to hold a batch with one; lower degrees are reported **infeasible** with the sequence
that does not fit, not dropped).

**The regime** (printed with every table; BENCHMARKS.md gives both runs): by default the
example's ``small`` GPT (4 layers, 4 heads, ``--width`` 128: 1.09M parameters), ``--batch`` 16
sequences per step (about 4.2K tokens on long-tail, 6.8K on lognormal) and 512 tokens per rank:
the last session's setting, kept so the figures compare. Why the cap: a long-tail giant
(1025-2048 tokens) then needs the largest group, as the planner benchmark's 64K-256K giants need
the large groups there, so a static degree must be 4. ``--width 64 --batch 64`` (0.35M
parameters, about 13.9K tokens per step; meant to raise the all-to-all's share and amortise the
per-step costs) was measured too and gave FlexSP less, not more (1.11x against 1.17x on
long-tail), and so did ``--max-len 4096 --max-tokens 1024 --batch 32`` (giants of 2048-4096
tokens, documents fitting one rank: 1.13x). The planner runs with ``seqpar.solver = greedy`` (``--solver``): rank 0's solve
shares the 2 cores with training, and on 64-sequence long-tail batches the MILP gave the same
modeled plans (within 0.1 %) at three times the CPU. A group

1. warms up (one step per variant);
2. **calibrates** the cost model on the runtime's own steps: ``--calib-steps`` held-out batches, each
   run with static groups of 1, 2 and 4 (the sequences a group of that size can hold), and the
   per-group forward+backward times fitted by :mod:`dtrain.seqpar.calibrate`; the planner plans
   with the refitted cluster from then on;
3. measures ``--steps`` batches, each under every variant in an order rotated per step
   (interleaved): ``static-1``, ``static-2``, ``static-4`` (every group of that size,
   :func:`dtrain.seqpar.schedule.static_schedule`) and ``flexsp`` (the planner's plan, solved one
   step ahead in rank 0's background thread; whatever of that solve is still running when the
   flexsp step ends is waited for and counted in its step time, so it cannot hide in another
   variant's step).

Per variant (medians over every measured step of every repeat): step time, tokens/s, spread
between the groups, ``plan_wait_s``, and the calibrated model's predicted forward+backward time
against the measured one (``sp_measured_s``). The FlexSP ÷ best-feasible-static ratio is also
given per repeat. Results: ``--out`` (JSON) and a table on stdout; the load average is recorded.
Run it alone: ``flock -x /work/notes/cpu.lock timeout 1500 python benchmarks/seqpar.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ("static-1", "static-2", "static-4", "flexsp")
DEGREES = (1, 2, 4)
def model_spec(width: int) -> str:
    """The benchmark's GPT (``small`` preset, ``--width``) for `dtrain plan calibrate --seqpar`."""
    return f"layers=4,hidden={width},heads=4,vocab=256,tied=1"


def gpt_params(width: int, max_len: int) -> int:
    """Parameters of the benchmark's GPT (``small`` preset at ``width``)."""
    from dtrain.models import GPT, GPTConfig

    return sum(p.numel() for p in GPT(GPTConfig.preset("small", vocab_size=256, block_size=max_len,
                                                       n_embd=width)).parameters())


def worker(args: argparse.Namespace) -> None:
    import torch

    import dtrain
    from dtrain.models import GPT, GPTConfig
    from dtrain.seqpar import SeqBatch, SeqParError
    from dtrain.seqpar import calibrate as cal
    from dtrain.seqpar.lengths import sample_lengths
    from dtrain.seqpar.schedule import static_schedule

    torch.set_num_threads(1)
    data = torch.frombuffer(bytearray((ROOT / "examples/data/corpus.txt").read_bytes()), dtype=torch.uint8)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small", vocab_size=256, block_size=args.max_len, n_embd=args.width))
    seqpar = {"enabled": True, "lookahead": 1, "max_tokens_per_rank": args.max_tokens, "solver_time_s": args.solver_time,
              "solver": args.solver}
    if args.cluster:
        seqpar["cluster"] = args.cluster
    engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                         config={"train": {"loss_norm": "tokens"}, "seqpar": seqpar})
    plugin = next(p for p in engine.plugins if p.name == "seqpar")
    rank, world = engine.runtime.rank, engine.runtime.world_size

    def batch(seed: int, limit: int | None = None, count: int | None = None) -> list[torch.Tensor]:
        lengths = sample_lengths(args.mix, count or args.batch, seed, args.max_len)
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(data) - args.max_len - 1, (len(lengths),), generator=g).tolist()
        return [data[a:a + n].long() for a, n in zip(starts, lengths) if limit is None or n <= limit]

    def timed(item) -> float:
        engine.comm.barrier()
        t0 = time.perf_counter()
        engine.train_step(item)
        if plugin._ahead is not None:  # the next batch's solve: counted here, not in another variant's step
            plugin._ahead[1].result()
        return time.perf_counter() - t0

    base_cost = plugin._cost(world)

    def static(seqs: list[torch.Tensor], degree: int):
        return static_schedule([s.numel() for s in seqs], world, degree, args.max_tokens, base_cost.seq_time)

    # 1. warm-up: every variant once (first solve, group creation, allocator)
    seed0 = 1000 + 100 * args.repeat
    seqs = batch(seed0)
    for variant in VARIANTS:
        if variant == "flexsp":
            timed(SeqBatch(seqs))
        else:
            try:
                timed(SeqBatch(seqs, plan=static(seqs, int(variant.split("-")[1]))))
            except SeqParError:
                pass
    # 2. calibration on held-out batches with static groups of every size
    samples: list = []
    t_cal = time.perf_counter()
    for c in range(args.calib_steps):
        for degree in DEGREES:
            count = args.batch if c % 2 == 0 else max(4, args.batch // 2)  # two batch sizes: fixed vs per-token costs
            seqs = batch(5000 + 100 * args.repeat + c, degree * args.max_tokens, count)
            timed(SeqBatch(seqs, plan=static(seqs, degree)))
            samples += plugin.group_samples()
    cluster_path = Path(args.tmp) / f"cluster-{args.mix}-{args.repeat}.toml"
    fitted = cal.fit(samples)
    if rank == 0:
        cluster_path.write_text(cal.to_cluster(fitted, plugin.shape, base_cost.cluster).to_toml())
    engine.comm.barrier()
    plugin.use_cluster(str(cluster_path), [s.numel() for s in batch(seed0 + 1)])
    calibration_s = time.perf_counter() - t_cal
    # 3. measured steps, variants interleaved in a rotated order
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    infeasible: dict[str, str] = {}
    for step in range(1, args.steps + 1):
        seqs = batch(seed0 + step)
        lengths = [s.numel() for s in seqs]
        shift = (step + args.repeat) % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            if variant in infeasible:
                continue
            if variant == "flexsp":
                nxt = [s.numel() for s in batch(seed0 + step + 1)] if step < args.steps else None
                item = SeqBatch(seqs, next_lengths=nxt)
            else:
                try:
                    item = SeqBatch(seqs, plan=static(seqs, int(variant.split("-")[1])))
                except SeqParError as exc:
                    infeasible[variant] = str(exc)
                    continue
            wall = timed(item)
            m = plugin.metrics()
            rows[variant].append({"step_s": wall, "tokens": sum(lengths), "groups": m.get("sp_groups"),
                                  **{k: m.get(k) for k in ("plan_wait_s", "plan_solve_s", "sp_group_spread",
                                                           "sp_measured_s", "plan_predicted_s", "plan_choice")}})
    engine.close()
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "rows": rows, "infeasible": infeasible, "calibration_s": calibration_s, "fit": fitted.to_dict(),
            "samples": [{"d": s.d, "lengths": list(s.lengths), "seconds": s.seconds} for s in samples]}))


def summarize(rows: list[dict]) -> dict:
    def med(key: str):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    errors = [(r["plan_predicted_s"] - r["sp_measured_s"]) / r["sp_measured_s"] for r in rows
              if r.get("plan_predicted_s") is not None and r.get("sp_measured_s")]
    return {"steps": len(rows), "step_s": med("step_s"),
            "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in rows),
            "spread": med("sp_group_spread"), "plan_wait_s": med("plan_wait_s"), "plan_solve_s": med("plan_solve_s"),
            "predicted_s": med("plan_predicted_s"), "measured_s": med("sp_measured_s"),
            "pred_error_median": statistics.median(errors) if errors else None,
            "pred_abs_error_max": max(abs(e) for e in errors) if errors else None,
            "groups_example": rows[0]["groups"] if rows else None,
            "choices": dict(Counter(r["plan_choice"] for r in rows if r.get("plan_choice")))}


def launch(args: argparse.Namespace, mix: int, repeat: int, hosts, port: int) -> dict:
    from _bench_util import run_rank_group

    result = Path(args.tmp) / f"result-{mix}-{repeat}.json"
    result.unlink(missing_ok=True)
    argv = [str(Path(__file__).resolve()), "--worker", "--mix", mix, "--repeat", str(repeat), "--result", str(result),
            "--tmp", args.tmp, "--steps", str(args.steps), "--calib-steps", str(args.calib_steps), "--batch",
            str(args.batch), "--max-len", str(args.max_len), "--max-tokens", str(args.max_tokens),
            "--solver-time", str(args.solver_time), "--solver", args.solver, "--width", str(args.width)] + (["--cluster", args.cluster] if args.cluster else [])
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    if hosts is None:
        out = run_rank_group([sys.executable] + argv, 4, timeout_s=args.timeout_s, env=env)
        if not out.ok:
            raise RuntimeError(f"{mix} #{repeat}: {out.error}")
    else:
        from dtrain import netns

        codes = netns.wait_all(netns.spawn_ranks(hosts, 4 // args.nodes, argv, port=port, env=env), args.timeout_s)
        if codes != [0] * 4:
            raise RuntimeError(f"{mix} #{repeat}: ranks exited with {codes}")
    return json.loads(result.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repeat, 2 measured steps, 2 calibration batches")
    p.add_argument("--nodes", type=int, default=2, choices=(1, 2), help="simulated hosts (2: netns, root needed)")
    p.add_argument("--net", default="1gbit", help="rate of the link between the hosts (--nodes 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="measured batches per repeat (each under every variant)")
    p.add_argument("--calib-steps", type=int, default=3, help="held-out batches per degree for the calibration")
    p.add_argument("--batch", type=int, default=16, help="sequences per global batch")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--width", type=int, default=128, help="the GPT's hidden size (small preset: 128; 4 layers, 4 heads)")
    p.add_argument("--max-tokens", type=int, default=512, help="seqpar.max_tokens_per_rank")
    p.add_argument("--solver-time", type=float, default=0.5)
    p.add_argument("--solver", default="greedy", choices=("highs", "cbc", "greedy"),
                   help="seqpar.solver (greedy: same plans here at a third of the CPU the MILP takes from rank 0)")
    p.add_argument("--cluster", help="cluster TOML the calibration starts from (default cluster/cpu_local.toml)")
    p.add_argument("--mixes", default="longtail,lognormal")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/seqpar.json"))
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mix", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.repeats, args.steps, args.calib_steps = 1, 2, 2
    from _bench_util import machine_info, write_json

    args.tmp = tempfile.mkdtemp(prefix="dtrain-seqpar-")
    mixes = args.mixes.split(",")
    results: dict = {"machine": machine_info(), "command": "python benchmarks/seqpar.py " + " ".join(sys.argv[1:]),
                     "args": {k: v for k, v in vars(args).items() if k not in ("worker", "mix", "repeat", "result")},
                     "loadavg_before": os.getloadavg(), "runs": {m: [] for m in mixes}}
    hosts_cm = None
    if args.nodes == 2:
        from dtrain import netns

        reason = netns.unavailable_reason()
        if reason:
            print(f"benchmarks/seqpar.py --nodes 2 needs the slow-link harness: {reason}; or use --nodes 1",
                  file=sys.stderr)
            return 2
        hosts_cm = netns.create_hosts(2, args.net, prefix="dtrain-sp")
    t0 = time.perf_counter()
    hosts = hosts_cm.__enter__() if hosts_cm is not None else None
    try:
        port = 29700
        for repeat in range(args.repeats):
            for mix in (mixes if repeat % 2 == 0 else mixes[::-1]):
                port += 1
                raw = launch(args, mix, repeat, hosts, port)
                raw["loadavg_1m"] = os.getloadavg()[0]
                results["runs"][mix].append(raw)
                s = {v: summarize(r) for v, r in raw["rows"].items() if r}
                best = max((x["tokens_per_s"] for v, x in s.items() if v != "flexsp"), default=None)
                print(f"{mix} #{repeat}: " + "  ".join(f"{v} {x['tokens_per_s']:.0f} tok/s" for v, x in s.items())
                      + f"  flexsp/best static {s['flexsp']['tokens_per_s'] / best:.2f}x  fit residual median "
                      f"{raw['fit']['median_rel_residual']:.2f}  load {raw['loadavg_1m']:.1f}", flush=True)
    finally:
        if hosts_cm is not None:
            hosts_cm.__exit__(None, None, None)
    results["wall_s"] = time.perf_counter() - t0
    results["loadavg_after"] = os.getloadavg()
    results["mixes"] = {}
    for mix in mixes:
        runs = results["runs"][mix]
        pooled = {v: [r for run in runs for r in run["rows"][v]] for v in VARIANTS}
        summary = {v: summarize(rs) for v, rs in pooled.items() if rs}
        infeasible = {v: run["infeasible"][v] for run in runs for v in run["infeasible"]}
        ratios = []
        for run in runs:
            s = {v: summarize(r) for v, r in run["rows"].items() if r}
            best = max((x["tokens_per_s"] for v, x in s.items() if v != "flexsp"), default=None)
            ratios.append(s["flexsp"]["tokens_per_s"] / best if best else None)
        for v, rs in pooled.items():  # the same batches under every variant: total tokens / total time
            if rs:
                summary[v]["tokens_per_s_total"] = sum(r["tokens"] for r in rs) / sum(r["step_s"] for r in rs)
        statics = [v for v in summary if v != "flexsp"]
        top = max(statics, key=lambda v: summary[v]["tokens_per_s_total"], default=None)
        paired = [a["step_s"] / b["step_s"] for run in runs for a, b in zip(run["rows"][top], run["rows"]["flexsp"])] if top else []
        best = max((s["tokens_per_s"] for v, s in summary.items() if v != "flexsp"), default=None)
        results["mixes"][mix] = {"summary": summary, "infeasible": infeasible, "best_static": top,
                                 "flexsp_vs_best_static_total": summary["flexsp"]["tokens_per_s_total"]
                                 / summary[top]["tokens_per_s_total"] if top else None,
                                 "flexsp_vs_best_static_paired_median": statistics.median(paired) if paired else None,
                                 "flexsp_vs_best_static": summary["flexsp"]["tokens_per_s"] / best if best else None,
                                 "flexsp_vs_best_static_per_repeat": ratios,
                                 "fit_median_rel_residual": [run["fit"]["median_rel_residual"] for run in runs]}
        tokens = [r["tokens"] for r in pooled["flexsp"]]
        results["mixes"][mix]["regime"] = regime = {
            "model": model_spec(args.width), "params": gpt_params(args.width, args.max_len),
            "max_tokens_per_rank": args.max_tokens, "sequences_per_step": args.batch,
            "tokens_per_step_median": statistics.median(tokens) if tokens else None}
        print(f"\n{mix}: GPT {regime['model']} ({regime['params'] / 1e6:.2f}M parameters), {args.batch} sequences per "
              f"batch (median {regime['tokens_per_step_median']:.0f} tokens per step), max_tokens_per_rank "
              f"{args.max_tokens}, {len(runs)} repeats x {args.steps} measured steps per variant, "
              f"{'2 hosts x 2 ranks at ' + args.net if hosts else '1 host x 4 ranks'}")
        print(f"{'variant':10} {'step_s':>8} {'tok/s':>8} {'spread':>7} {'wait_s':>8} {'pred_s':>8} {'meas_s':>8} {'err':>7}")
        fmt = lambda x, spec: format(x, spec) if x is not None else "-"
        for v in VARIANTS:
            if v not in summary:
                print(f"{v:10} infeasible: {infeasible.get(v, 'not run')}")
                continue
            s = summary[v]
            print(f"{v:10} {s['step_s']:8.3f} {s['tokens_per_s']:8.0f} {fmt(s['spread'], '7.2f')} "
                  f"{fmt(s['plan_wait_s'], '8.4f')} {fmt(s['predicted_s'], '8.3f')} {fmt(s['measured_s'], '8.3f')} "
                  f"{fmt(s['pred_error_median'], '+7.1%')}")
        print(f"flexsp plans kept: {summary['flexsp']['choices']}")
        mres = results["mixes"][mix]
        print(f"flexsp / best static ({top}): total tokens / total time {fmt(mres['flexsp_vs_best_static_total'], '.3f')}, "
              f"paired per-batch step-time ratio median {fmt(mres['flexsp_vs_best_static_paired_median'], '.3f')}, "
              f"median tokens/s {fmt(mres['flexsp_vs_best_static'], '.3f')} (per repeat: {', '.join(fmt(r, '.2f') for r in ratios)})")
        write_json(Path(args.out).with_name(f"{Path(args.out).stem}_samples_{mix}.json"),
                   {"model": model_spec(args.width), "samples": runs[-1]["samples"]})
    write_json(args.out, results)
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
