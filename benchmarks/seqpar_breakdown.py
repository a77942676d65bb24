"""Where a seqpar step's time goes: per-phase timers on every rank (issue 16, the fixed cost per micro-batch).

    python benchmarks/seqpar_breakdown.py [--nodes 2 --net 1gbit] [--repeats 3] [--out FILE]

Same setting as benchmarks/seqpar.py (4 ranks, by default 2 netns hosts x 2 at 1 Gbit, the
``small`` GPT with 2048 positions, ``max_tokens_per_rank`` 512). The engine's methods are wrapped
with timers (this script only; nothing in dtrain changes), and two experiments run:

1. **Fixed cost per micro-batch**: 16 sequences of 32 tokens under hand-written plans of ``K``
   micro-batches of groups of ``d`` (``K`` in 1, 2, 4, 8; ``d`` in 1, 2, 4): the slope of the step
   time over ``K`` is the fixed cost of one micro-batch on groups of ``d`` (the tokens are the same).
2. **A long-tail batch** under static degree 4 and the FlexSP plan: each phase's seconds.

Phases (per rank, summed over the step): ``split`` (plan broadcast, group creation, packing),
``forward``, ``backward``, ``a2a`` (inside forward and backward: the Ulysses all-to-alls,
including the wait for the group's slowest member), ``grad_sync`` (the layout's
``finish_backward``: the gradient reduction of the last micro-batch), ``optimizer``, ``after_step``
(the plugin's all-gather of its timings), ``record`` (the engine's metrics all-reduce) and
``other`` (the step time less all of these). Medians over ``--repeats`` steps; per phase, the
slowest rank.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PHASES = ("split", "forward", "backward", "a2a", "grad_sync", "optimizer", "after_step", "record")


def worker(args: argparse.Namespace) -> None:
    import torch

    import dtrain
    from dtrain.models import GPT, GPTConfig
    from dtrain.seqpar import SeqBatch
    from dtrain.seqpar.lengths import sample_lengths
    from dtrain.seqpar.schedule import static_schedule

    torch.set_num_threads(1)
    data = torch.frombuffer(bytearray((ROOT / "examples/data/corpus.txt").read_bytes()), dtype=torch.uint8)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small", vocab_size=256, block_size=args.max_len))
    engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                         config={"train": {"loss_norm": "tokens"},
                                 "seqpar": {"enabled": True, "lookahead": 1, "max_tokens_per_rank": args.max_tokens,
                                            "solver_time_s": args.solver_time}})
    plugin = next(p for p in engine.plugins if p.name == "seqpar")
    rank, world = engine.runtime.rank, engine.runtime.world_size
    acc: dict[str, float] = defaultdict(float)
    marks: dict[str, float] = {}

    def timed(obj, name: str, phase: str, after=None):
        inner = getattr(obj, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                t1 = time.perf_counter()
                acc[phase] += t1 - t0
                if after:
                    after(t1)
        setattr(obj, name, wrapper)

    timed(plugin, "split_batch", "split")
    timed(engine, "forward_objective", "forward", after=lambda t: marks.__setitem__("fwd_end", t))

    inner_finish = engine.layout.finish_backward

    def finish_backward():  # backward: from the forward's end to here; grad_sync: the layout's reduction
        t0 = time.perf_counter()
        acc["backward"] += t0 - marks.pop("fwd_end", t0)
        inner_finish()
        acc["grad_sync"] += time.perf_counter() - t0
    engine.layout.finish_backward = finish_backward
    timed(engine.layout, "optimizer_step", "optimizer")
    timed(plugin, "after_step", "after_step")
    timed(engine, "_record", "record")
    timed(engine.comm, "all_to_all_single", "a2a")

    def run(item) -> dict[str, float]:
        engine.comm.barrier()
        acc.clear()
        t0 = time.perf_counter()
        engine.train_step(item)
        wall = time.perf_counter() - t0
        row = {p: acc.get(p, 0.0) for p in PHASES}
        row["wall"] = wall
        row["other"] = wall - sum(row[p] for p in PHASES if p != "a2a")  # a2a is inside forward/backward
        return row

    def slowest(row: dict[str, float]) -> dict[str, float]:
        keys = sorted(row)
        mine = torch.tensor([row[k] for k in keys], dtype=torch.float64)
        every = torch.empty(world * len(keys), dtype=torch.float64)
        engine.comm.all_gather(every, mine)
        return dict(zip(keys, every.view(world, len(keys)).max(0).values.tolist()))

    def median_rows(item_fn, repeats: int) -> dict[str, float]:
        rows = [slowest(run(item_fn())) for _ in range(repeats)]
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    out: dict = {"fixed": {}, "longtail": {}}
    # 1. fixed cost per micro-batch: the same 16 x 32 tokens in K micro-batches of groups of d
    short = [data[i * 64:i * 64 + 32].long() for i in range(16)]
    for d in (1, 2, 4):
        for k in (1, 2, 4, 8):
            per = len(short) // k
            groups = world // d
            spec = []
            for m in range(k):
                seqs = list(range(m * per, (m + 1) * per))
                spec.append([(d, seqs[g::groups]) for g in range(groups) if seqs[g::groups]])
            run(SeqBatch(short, plan=spec))  # warm (group creation)
            out["fixed"][f"d{d}_k{k}"] = median_rows(lambda: SeqBatch(short, plan=spec), args.repeats)
    # 2. a long-tail batch: static degree 4 vs the FlexSP plan
    for seed in range(args.batches):
        lengths = sample_lengths("longtail", 16, 1000 + seed, args.max_len)
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(data) - args.max_len - 1, (len(lengths),), generator=g).tolist()
        seqs = [data[a:a + n].long() for a, n in zip(starts, lengths)]
        static4 = static_schedule(lengths, world, 4, args.max_tokens, plugin._cost(world).seq_time)
        run(SeqBatch(seqs, plan=static4))
        out["longtail"][f"static-4/{seed}"] = median_rows(lambda: SeqBatch(seqs, plan=static4), args.repeats)
        out["longtail"][f"static-4/{seed}"]["micro_batches"] = len(static4.micro_batches)
        run(SeqBatch(seqs))
        row = median_rows(lambda: SeqBatch(seqs), args.repeats)
        row["micro_batches"] = len(plugin.metrics().get("sp_groups", []))
        row["groups"] = str(plugin.metrics().get("sp_groups"))
        out["longtail"][f"flexsp/{seed}"] = row
    engine.close()
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2, choices=(1, 2))
    p.add_argument("--net", default="1gbit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=2, help="long-tail batches of experiment 2")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--solver-time", type=float, default=0.5)
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    tmp = tempfile.mkdtemp(prefix="dtrain-spbd-")
    result = Path(tmp) / "result.json"
    argv = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--repeats", str(args.repeats),
            "--batches", str(args.batches), "--max-len", str(args.max_len), "--max-tokens", str(args.max_tokens),
            "--solver-time", str(args.solver_time)]
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if args.nodes == 1:
        from _bench_util import run_rank_group

        res = run_rank_group([sys.executable] + argv, 4, timeout_s=args.timeout_s, env=env)
        if not res.ok:
            print(res.error, file=sys.stderr)
            return 1
    else:
        from dtrain import netns

        reason = netns.unavailable_reason()
        if reason:
            print(f"benchmarks/seqpar_breakdown.py --nodes 2 needs the slow-link harness: {reason}; or use --nodes 1",
                  file=sys.stderr)
            return 2
        with netns.create_hosts(2, args.net, prefix="dtrain-spbd") as hosts:
            codes = netns.wait_all(netns.spawn_ranks(hosts, 2, argv, port=29690, env=env), args.timeout_s)
        if codes != [0] * 4:
            print(f"ranks exited with {codes}", file=sys.stderr)
            return 1
    out = json.loads(result.read_text())
    out["loadavg_before"], out["loadavg_after"], out["wall_s"] = load0, os.getloadavg(), time.perf_counter() - t0
    cols = ("wall",) + PHASES + ("other",)
    print(f"{'run':16} " + " ".join(f"{c:>9}" for c in cols))
    for section in ("fixed", "longtail"):
        for name, row in out[section].items():
            print(f"{name:16} " + " ".join(f"{row[c]:9.4f}" for c in cols) + (f"  {row.get('groups', '')}"))
    for d in (1, 2, 4):
        ks = [1, 2, 4, 8]
        walls = [out["fixed"][f"d{d}_k{k}"]["wall"] for k in ks]
        n = len(ks)
        mk, mw = sum(ks) / n, sum(walls) / n
        slope = sum((k - mk) * (w - mw) for k, w in zip(ks, walls)) / sum((k - mk) ** 2 for k in ks)
        out.setdefault("fixed_slope_s", {})[d] = slope
        print(f"fixed cost per micro-batch, groups of {d}: {slope:.4f} s (least squares over K = 1, 2, 4, 8)")
    print(f"load {load0[0]:.2f} -> {out['loadavg_after'][0]:.2f}, wall {out['wall_s']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
