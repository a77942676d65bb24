"""Soak test of the fault harness (not CI): many random faults in one run, and the bits must match.

    python benchmarks/soak.py --faults 30              # one seed, 30 faults, ~10 min on 2 busy cores
    python benchmarks/soak.py --faults 8 --seeds 1,2   # two shorter runs

Owns the soak: for every seed, one ``dtrain launch --nodes 2 --nproc 2`` run (world 4, two simulated
nodes, ZeRO-3, in-memory snapshots every step) of examples/train_gpt.py with
``--inject chaos:faults=N,seed=S,kinds=kill+node-loss+corrupt+hang`` and ``--max-restarts N``:
the harness (dtrain/faults/) draws N faults of those kinds from the seed, at distinct steps two
apart, and fires each once. Before the faulty runs, one fault-free run of the same job gives the
reference ``param_sha256``; every faulty run must end with exactly that hash (restoring from
snapshots is bit-exact, so any lost or doubled step, or any state restored wrongly, changes it).

Per seed it reports N, the faults that fired (``fault`` events), the restarts (the summary's
``restarts`` and the ``restart`` events), where each restart resumed from, and the total and
median recovery time (``recovery_s`` of the restart events: from the failure to the restored state;
docs/metrics.md). ``comm.timeout_s`` is short (``--collective-timeout-s``) so a ``hang`` costs
seconds, not minutes. Writes benchmarks/results/soak.json (``--out``); exit status 0 only if every
run ended sha-equal with one restart per fault.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _bench_util import machine_info, write_json  # noqa: E402
from snapshot import read_metrics, run_launch, summary_record  # noqa: E402

KINDS = "kill+node-loss+corrupt+hang"
NODES, NPROC = 2, 2


def launch_cmd(args: argparse.Namespace, metrics: Path, inject: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "dtrain.launch.cli", "launch", "--nodes", str(NODES), "--nproc", str(NPROC),
           "--no-progress", "--collective-timeout-s", str(args.collective_timeout_s)]
    if inject:
        cmd += ["--max-restarts", str(args.faults), "--inject", inject]
    for s in ("zero.stage=3", "snapshot.enabled=true"):
        cmd += ["--set", s]
    return cmd + [str(ROOT / "examples" / "train_gpt.py"), "--steps", str(args.steps), "--model", args.model,
                  "--batch-size", str(args.batch_size), "--seed", str(args.train_seed), "--metrics", str(metrics)]


def one_run(args: argparse.Namespace, work: Path, name: str, inject: str | None) -> dict[str, Any]:
    metrics = work / f"{name}.jsonl"
    log = work / f"{name}.log"
    outcome = run_launch(launch_cmd(args, metrics, inject), log, args.timeout_s)
    records = read_metrics(metrics)
    summary = summary_record(records)
    restarts = [r for r in records if r.get("event") == "restart"]
    fired = [r for r in records if r.get("event") == "fault"]
    recovery = [float(r["recovery_s"]) for r in restarts if r.get("recovery_s") is not None]
    out = {"name": name, "inject": inject, **outcome, "rc_ok": outcome["rc"] == 0 and bool(summary),
           "param_sha256": summary.get("param_sha256"), "restarts": summary.get("restarts"),
           "restart_events": len(restarts), "faults_fired": len(fired),
           "fired": [f.get("spec") for f in fired],
           "resumed_from": [r.get("resumed_from_step") for r in restarts],
           "sources": sorted({re.sub(r" of step \d+", "", str(r.get("source", ""))) for r in restarts}),
           "recovery_total_s": sum(recovery) if recovery else 0.0,
           "recovery_median_s": statistics.median(recovery) if recovery else None,
           "recovery_max_s": max(recovery) if recovery else None}
    if not out["rc_ok"]:
        out["log_tail"] = log.read_text(errors="replace")[-3000:]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=30, help="faults per run (N)")
    p.add_argument("--seeds", default="0", help="comma-separated chaos seeds, one run each")
    p.add_argument("--steps", type=int, help="training steps (default 2 N + 8: faults are two steps apart)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--collective-timeout-s", type=float, default=5.0, help="how long a hang takes to notice")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per launch")
    p.add_argument("--out", default=str(HERE / "results" / "soak.json"))
    args = p.parse_args(argv)
    if args.faults < 1:
        p.error("--faults must be at least 1")
    args.steps = args.steps or 2 * args.faults + 8
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    started = time.time()
    load = {"start": os.getloadavg()}
    reference = one_run(args, work, "reference", None)
    print(f"[{time.time() - started:5.0f}s] reference: rc_ok={reference['rc_ok']} sha={reference['param_sha256']}",
          flush=True)
    runs = []
    for seed in args.seed_list:
        run = one_run(args, work, f"seed{seed}", f"chaos:faults={args.faults},seed={seed},kinds={KINDS}")
        run["seed"] = seed
        run["sha_equal"] = bool(run["param_sha256"]) and run["param_sha256"] == reference["param_sha256"]
        run["ok"] = (run["rc_ok"] and run["sha_equal"] and run["faults_fired"] == args.faults
                     and run["restarts"] == args.faults)
        runs.append(run)
        print(f"[{time.time() - started:5.0f}s] seed {seed}: ok={run['ok']} sha_equal={run['sha_equal']} "
              f"fired={run['faults_fired']}/{args.faults} restarts={run['restarts']} "
              f"recovery total {run['recovery_total_s']:.1f}s median {run['recovery_median_s']} "
              f"wall {run['wall_s']:.0f}s", flush=True)
    load["end"] = os.getloadavg()
    results = {"benchmark": "soak",
               "command": " ".join(["python", "benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)]),
               "machine": {**machine_info(), "load_avg": load,
                           "note": "2 CPU cores shared with other agents' tests and benchmarks"},
               "settings": {k: getattr(args, k) for k in ("faults", "steps", "model", "batch_size", "train_seed",
                                                          "collective_timeout_s")}
                           | {"kinds": KINDS, "world": NODES * NPROC, "nodes": NODES, "zero_stage": 3},
               "reference": reference, "runs": runs, "wall_s": time.time() - started,
               "all_ok": reference["rc_ok"] and all(r["ok"] for r in runs)}
    write_json(args.out, results)
    print(json.dumps({k: results[k] for k in ("all_ok", "wall_s")}))
    if not results["all_ok"]:
        print(f"work directory kept for inspection: {work}", file=sys.stderr)
        return 1
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
