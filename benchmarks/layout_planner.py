"""The zero-level planner's predicted step times vs benchmarks/hierarchical.py's measured ones.

    python benchmarks/layout_planner.py --cluster cluster/netns_1gbit.toml                # read results
    python benchmarks/layout_planner.py --cluster cluster/netns_1gbit.toml --run --rates 1gbit \\
        --variants zero3,hsdp,hpz,frontier3,auto --repeats 3                              # measure first

Reads a results JSON of benchmarks/hierarchical.py (top-level ``args`` and ``rates`` -> rate ->
variant -> ``step_s_median``, ``levels``, ``bytes_per_step``, ...; extra keys and variants that are
not dtrain assignments, e.g. DeepSpeed or FSDP2 peers without ``levels``, are tolerated; a missing
``args.preset`` means GPT preset ``small``). For every dtrain variant it predicts the step time with
:func:`dtrain.planner.layout.predict_step` from the cluster file (the model's real units, the
benchmark's tokens per rank), prints predicted vs measured and the relative error, the fastest
measured assignment, and whether the planner's pick is within 10% of it: the ``auto`` variant as
measured (``zero.preset = "auto"`` at start-up, with ``DTRAIN_CLUSTER`` = the cluster file under
``--run``) and the offline pick among the measured assignments (the one with the least predicted
step time). ``--run`` first runs ``python benchmarks/hierarchical.py --rates R --variants V
[--repeats N --steps S --warmup W]`` with ``DTRAIN_CLUSTER`` set. Writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TARGET_PICK, TARGET_ERROR = 0.10, 0.20


def _gather_dtype(name: str, variant: dict) -> str:
    return variant.get("gather_dtype") or ("int8" if "int8" in name else "bf16" if "bf16" in name else "fp32")


def _is_dtrain(variant: dict) -> bool:
    levels = variant.get("levels")
    return variant.get("framework", "dtrain") == "dtrain" and isinstance(levels, dict) and {"params", "grads", "optim", "backward_params"} <= set(levels)


def compare(results: dict, cluster_path: str) -> dict:
    """Predicted vs measured for every rate and dtrain variant of ``results``."""

    from dtrain.hierarchy import resolve_levels
    from dtrain.models import GPT
    from dtrain.planner.calibrate import gpt_shape
    from dtrain.planner.cluster import ClusterSpec, load_cluster
    from dtrain.planner.layout import layout_units, predict_step
    from dtrain.topology import Shape
    from types import SimpleNamespace

    sys.path.insert(0, str(HERE))
    from hierarchical import model_config  # the benchmark's presets (``mid`` is ``small`` widened)

    args = results.get("args", {})
    preset = args.get("preset") or "small"
    topology = results.get("topology", {})
    nodes = int(topology.get("nodes", args.get("nodes", 2)))
    nproc = int(topology.get("nproc_per_node", args.get("nproc", 2)))
    world = nodes * nproc
    cfg = model_config(preset)
    tokens_per_rank = results.get("tokens_per_step", int(args.get("batch", 8)) * cfg.block_size) / world
    shape = Shape.of(world, 0, nodes)
    units = layout_units(GPT(cfg), shape)
    flops = gpt_shape(cfg).dense_flops_per_token
    cluster = load_cluster(cluster_path)
    cluster = ClusterSpec(**{**cluster.__dict__, "num_devices": world, "devices_per_node": nproc})
    out: dict = {"cluster": cluster_path, "preset": preset, "world": world, "tokens_per_rank": tokens_per_rank,
                 "rates": {}}
    for rate, variants in results.get("rates", {}).items():
        rows = {}
        for name, v in variants.items():
            if not _is_dtrain(v) or "step_s_median" not in v:
                continue
            levels = resolve_levels(SimpleNamespace(stage=0, preset=None, **v["levels"]), shape)
            p = predict_step(units, levels, shape, cluster, flops_per_token=flops, tokens_per_rank=tokens_per_rank,
                             gather_dtype=_gather_dtype(name, v))
            measured = v["step_s_median"]
            rows[name] = {"levels": v["levels"], "measured_s": measured, "predicted_s": p["step_s"],
                          "compute_s": p["compute_s"], "comm_s": p["comm_s"],
                          "rel_error": (p["step_s"] - measured) / measured,
                          "bytes_predicted": p["bytes_per_level"], "bytes_measured": v.get("bytes_per_step")}
        if not rows:
            continue
        fastest = min(rows, key=lambda n: rows[n]["measured_s"])
        best = rows[fastest]["measured_s"]
        offline = min((n for n in rows if "int8" not in n), key=lambda n: rows[n]["predicted_s"], default=fastest)
        others = {n: v["step_s_median"] for n, v in variants.items() if not _is_dtrain(v) and "step_s_median" in v}
        summary = {"fastest_measured": fastest, "fastest_measured_s": best,
                   "offline_pick": offline, "offline_pick_vs_fastest": rows[offline]["measured_s"] / best,
                   "max_abs_rel_error": max(abs(r["rel_error"]) for r in rows.values()),
                   "peers_measured_s": others}
        if "auto" in rows:
            summary["auto_levels"] = rows["auto"]["levels"]
            summary["auto_vs_fastest"] = rows["auto"]["measured_s"] / best
        out["rates"][rate] = {"variants": rows, "summary": summary}
    return out


def report(cmp: dict) -> str:
    lines = [f"cluster {cmp['cluster']}; GPT preset {cmp['preset']!r}, {cmp['world']} ranks, "
             f"{cmp['tokens_per_rank']:.0f} tokens per rank per step"]
    for rate, r in cmp["rates"].items():
        lines.append(f"{rate}: {'variant':>10} {'measured':>10} {'predicted':>10} {'(compute':>9} {'+ comm)':>8} "
                     f"{'error':>7}")
        for name, v in r["variants"].items():
            lines.append(f"{'':{len(rate) + 1}} {name:>10} {v['measured_s'] * 1e3:8.1f}ms {v['predicted_s'] * 1e3:8.1f}ms "
                         f"{v['compute_s'] * 1e3:8.1f} {v['comm_s'] * 1e3:8.1f} {100 * v['rel_error']:+6.1f}%")
        s = r["summary"]
        ok = "within" if s["max_abs_rel_error"] <= TARGET_ERROR else "NOT within"
        lines.append(f"  max |error| {100 * s['max_abs_rel_error']:.1f}% ({ok} the 20% target); fastest measured: "
                     f"{s['fastest_measured']} {s['fastest_measured_s'] * 1e3:.1f} ms")
        for key, label in (("auto_vs_fastest", "auto (start-up pick)"), ("offline_pick_vs_fastest",
                                                                          f"offline pick {s['offline_pick']}")):
            if key in s:
                verdict = "within" if s[key] <= 1 + TARGET_PICK else "NOT within"
                lines.append(f"  {label}: {s[key]:.3f}x the fastest ({verdict} 10%)")
        if "auto_levels" in s:
            lines.append(f"  auto chose {s['auto_levels']}")
        for name, t in s["peers_measured_s"].items():
            lines.append(f"  peer {name}: {t * 1e3:.1f} ms (not a dtrain assignment; not predicted)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cluster", required=True, help="cluster TOML (e.g. from `dtrain plan calibrate --layout`)")
    p.add_argument("--results", default=str(RESULTS / "hierarchical.json"), help="benchmarks/hierarchical.py's JSON")
    p.add_argument("--run", action="store_true", help="run benchmarks/hierarchical.py first (DTRAIN_CLUSTER set)")
    p.add_argument("--rates", default="1gbit")
    p.add_argument("--variants", default="zero3,hsdp,hpz,frontier3,auto")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "layout_planner.json"))
    args = p.parse_args(argv)
    if not Path(args.cluster).is_file():
        print(f"error: --cluster {args.cluster}: no such file; write one with `dtrain plan calibrate --layout "
              f"--out {args.cluster}`", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    if args.run:
        cmd = [sys.executable, str(HERE / "hierarchical.py"), "--rates", args.rates, "--variants", args.variants]
        for flag in ("repeats", "steps", "warmup"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag}", str(getattr(args, flag))]
        env = {**os.environ, "DTRAIN_CLUSTER": str(Path(args.cluster).resolve()),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        print("running", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env, cwd=ROOT)
        if rc:
            print(f"error: benchmarks/hierarchical.py exited with {rc}", file=sys.stderr)
            return rc
        args.results = str(RESULTS / "hierarchical.json")
    try:
        results = json.loads(Path(args.results).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read --results {args.results}: {exc}", file=sys.stderr)
        return 2
    cmp = compare(results, args.cluster)
    if not cmp["rates"]:
        print(f"error: {args.results} has no dtrain variant with 'levels' and 'step_s_median'", file=sys.stderr)
        return 2
    cmp["results"] = args.results
    cmp["results_command"] = results.get("command")
    print(report(cmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(cmp, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
