"""FlexSP runtime vs static Ulysses degrees on variable-length batches (dtrain/seqpar).

    python benchmarks/seqpar.py [--quick] [--steps N] [--cluster FILE] [--out results/seqpar.json]

4 ranks on one host (gloo, CPU). For each length mix (``longtail``, ``lognormal`` of
dtrain/seqpar/lengths.py) one rank group trains the example GPT (``small`` preset with
``--max-len`` positions) and, on every step's batch, runs each variant in turn, in an order
rotated per step (interleaved, so load changes on a shared machine hit every variant alike):

* ``static-1``, ``static-2``, ``static-4``: Ulysses with every group of that size
  (:func:`dtrain.seqpar.schedule.static_schedule`; infeasible when a sequence does not fit);
* ``flexsp``: the planner's plan, solved one step ahead in rank 0's background thread.

``seqpar.max_tokens_per_rank`` (``--max-tokens``, default 1024) is the memory limit that forces
the giants of the long-tail mix into groups of 2 or more. Per variant: median step time,
tokens/s, spread between the groups' times, plan_wait_s, and the cost model's predicted step
(``--cluster``, default this machine's calibrated cluster/cpu_local.toml) against the measured
forward+backward time. Results go to ``--out`` (JSON) and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ("static-1", "static-2", "static-4", "flexsp")


def worker(args: argparse.Namespace) -> None:
    import torch

    import dtrain
    from dtrain.models import GPT, GPTConfig
    from dtrain.seqpar import SeqBatch, SeqParError
    from dtrain.seqpar.lengths import sample_lengths
    from dtrain.seqpar.schedule import static_schedule

    torch.set_num_threads(1)
    data = torch.frombuffer(bytearray((ROOT / "examples/data/corpus.txt").read_bytes()), dtype=torch.uint8)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small", vocab_size=256, block_size=args.max_len))
    seqpar = {"enabled": True, "lookahead": 1, "max_tokens_per_rank": args.max_tokens, "solver_time_s": args.solver_time}
    if args.cluster:
        seqpar["cluster"] = args.cluster
    engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                         config={"train": {"loss_norm": "tokens"}, "seqpar": seqpar})
    plugin = next(p for p in engine.plugins if p.name == "seqpar")
    rank, world = engine.runtime.rank, engine.runtime.world_size

    def batch(step: int) -> list[torch.Tensor]:
        lengths = sample_lengths(args.mix, args.batch, 1000 + step, args.max_len)
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(data) - args.max_len - 1, (len(lengths),), generator=g).tolist()
        return [data[a:a + n].long() for a, n in zip(starts, lengths)]

    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    infeasible: dict[str, str] = {}
    cost = plugin._cost(world)
    for step in range(args.steps + 1):  # step 0 warms up (first planner call, group creation)
        seqs = batch(step)
        lengths = [s.numel() for s in seqs]
        order = VARIANTS[step % len(VARIANTS):] + VARIANTS[:step % len(VARIANTS)]
        for variant in order:
            if variant in infeasible:
                continue
            if variant == "flexsp":
                item = SeqBatch(seqs, next_lengths=[s.numel() for s in batch(step + 1)])
            else:
                degree = int(variant.split("-")[1])
                try:
                    plan = static_schedule(lengths, world, degree, args.max_tokens, cost.seq_time)
                except SeqParError as exc:
                    infeasible[variant] = str(exc)
                    continue
                item = SeqBatch(seqs, plan=plan)
            engine.comm.barrier()
            t0 = __import__("time").perf_counter()
            engine.train_step(item)
            wall = __import__("time").perf_counter() - t0
            m = plugin.metrics()
            if step > 0:
                rows[variant].append({"step_s": wall, "tokens": sum(lengths), **{k: m.get(k) for k in (
                    "plan_wait_s", "plan_solve_s", "sp_group_spread", "sp_measured_s", "plan_predicted_s")},
                    "groups": m.get("sp_groups")})
    engine.close()
    if rank == 0:
        print("RESULT " + json.dumps({"rows": rows, "infeasible": infeasible}))


def summarize(rows: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in rows) if rows and rows[0].get(key) is not None else None
    step = med("step_s")
    return {"steps": len(rows), "step_s": step, "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in rows),
            "spread": med("sp_group_spread"), "plan_wait_s": med("plan_wait_s"), "plan_solve_s": med("plan_solve_s"),
            "predicted_s": med("plan_predicted_s"), "measured_s": med("sp_measured_s"),
            "groups_example": rows[0]["groups"] if rows else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 measured steps per variant, 12 sequences per batch")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=24, help="sequences per global batch")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--solver-time", type=float, default=0.5)
    p.add_argument("--cluster", help="cluster TOML for the cost model (default cluster/cpu_local.toml)")
    p.add_argument("--mixes", default="longtail,lognormal")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/seqpar.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mix", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.steps, args.batch = 2, 12
    from _bench_util import machine_info, run_rank_group, write_json

    results = {"machine": machine_info(), "args": vars(args), "mixes": {}}
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    for mix in args.mixes.split(","):
        argv = [sys.executable, __file__, "--worker", "--mix", mix, "--steps", str(args.steps), "--batch",
                str(args.batch), "--max-len", str(args.max_len), "--max-tokens", str(args.max_tokens),
                "--solver-time", str(args.solver_time)] + (["--cluster", args.cluster] if args.cluster else [])
        out = run_rank_group(argv, 4, timeout_s=1800, env=env)
        if not out.ok:
            print(f"{mix}: failed: {out.error}", file=sys.stderr)
            return 1
        line = next(l for l in out.ranks[0].stdout_tail.splitlines() if l.startswith("RESULT "))
        raw = json.loads(line[len("RESULT "):])
        summary = {v: summarize(r) for v, r in raw["rows"].items() if r}
        best_static = max((s["tokens_per_s"] for v, s in summary.items() if v != "flexsp"), default=None)
        results["mixes"][mix] = {"summary": summary, "infeasible": raw["infeasible"], "raw": raw["rows"],
                                 "flexsp_vs_best_static": summary["flexsp"]["tokens_per_s"] / best_static
                                 if best_static else None}
        print(f"\n{mix}: {args.batch} sequences per batch, {args.steps} measured steps per variant")
        print(f"{'variant':10} {'step_s':>8} {'tok/s':>8} {'spread':>7} {'wait_s':>8} {'pred_s':>8} {'meas_s':>8}")
        for v in VARIANTS:
            if v in raw["infeasible"]:
                print(f"{v:10} infeasible: {raw['infeasible'][v]}")
                continue
            s = summary[v]
            fmt = lambda x, spec: format(x, spec) if x is not None else "-"
            print(f"{v:10} {s['step_s']:8.3f} {s['tokens_per_s']:8.0f} {fmt(s['spread'], '7.2f')} "
                  f"{fmt(s['plan_wait_s'], '8.4f')} {fmt(s['predicted_s'], '8.3f')} {fmt(s['measured_s'], '8.3f')}")
        print(f"flexsp / best static tokens/s: {results['mixes'][mix]['flexsp_vs_best_static']}")
    write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
