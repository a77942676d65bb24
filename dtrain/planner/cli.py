"""Command line of the planner: ``dtrain plan seqpar ...`` and ``dtrain plan calibrate ...``.

``main(argv)`` returns the exit status: 0 on success, 2 on bad input (the message is
printed as ``error: ...`` on stderr, without a traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dtrain.config import ConfigError
from dtrain.planner.cluster import REPO_CLUSTER_DIR, default_cluster, load_cluster
from dtrain.planner.cost import CostModel
from dtrain.planner.errors import PlannerError
from dtrain.planner.shapes import parse_model
from dtrain.planner.simulate import DISTRIBUTIONS, compare, format_summary, sample_lengths
from dtrain.planner.solve import PlannerOptions


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ArgumentError(f"{self.prog}: {message}")


def read_lengths(path: str) -> list[int]:
    """Lengths from a file: a JSON list, or integers separated by newlines, commas or spaces."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PlannerError(f"cannot read --lengths file {path!r}: {exc.strerror}") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise PlannerError(f"--lengths file {path!r} is not a valid JSON list: {exc}") from None
    else:
        values = stripped.replace(",", " ").split()
    out = []
    for k, v in enumerate(values):
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            raise PlannerError(
                f"--lengths file {path!r}: entry {k} ({v!r}) is not an integer; write one "
                "positive integer per line"
            ) from None
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dtrain plan", description="FlexSP sequence-parallel planner")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sp = sub.add_parser("seqpar", help="plan one batch and compare with static SP degrees")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--lengths", metavar="FILE", help="sequence lengths, one integer per line")
    src.add_argument("--dist", choices=DISTRIBUTIONS, help="sample a batch from a distribution")
    sp.add_argument("--gpus", type=int, default=None, help="devices (default: from the cluster file)")
    sp.add_argument("--gpus-per-node", type=int, default=None, help="devices per node")
    sp.add_argument("--model", default="7b", help="7b, 13b, gpt-bench or layers=..,hidden=..,heads=..,vocab=..")
    sp.add_argument("--cluster", metavar="FILE", help="cluster TOML (default cluster/a100_8x8.toml)")
    sp.add_argument("--json", action="store_true", help="print the plan and comparison as JSON")
    sp.add_argument("--seed", type=int, default=0, help="seed for --dist")
    sp.add_argument("--batch", type=int, default=512, help="sequences per batch for --dist")
    sp.add_argument("--time-limit", type=float, default=1.0, help="planning budget in seconds")
    sp.add_argument("--solver", choices=("highs", "cbc", "greedy"), default="highs")
    sp.add_argument("--buckets", type=int, default=16, help="length buckets for the MILP")

    cal = sub.add_parser("calibrate", help="measure alpha, beta and v(d) on this machine")
    cal.add_argument("--out", default=str(REPO_CLUSTER_DIR / "cpu_local.toml"),
                     help="cluster TOML to write (default cluster/cpu_local.toml)")
    cal.add_argument("--max-degree", type=int, default=2, help="largest d to measure (<= CPU cores)")
    cal.add_argument("--quick", action="store_true", help="fewer sizes and repeats (tests)")
    cal.add_argument("--json", action="store_true", help="print the report as JSON")
    cal.add_argument("--layout", action="store_true",
                     help="calibrate the zero-level planner instead (per-level bandwidth/latency, compute, "
                          "overlap) on --nodes namespaced hosts of --nproc ranks (docs/hierarchical.md)")
    cal.add_argument("--nodes", type=int, default=2, help="--layout: simulated hosts")
    cal.add_argument("--nproc", type=int, default=2, help="--layout: ranks per host")
    cal.add_argument("--net", default="bw=1gbit", help="--layout: inter-host link, bw=RATE[,latency=T][,burst=B]")
    cal.add_argument("--model", metavar="SPEC", help="--layout: the GPT to time (layers=..,hidden=..,heads=..,vocab=..; "
                     "default the example's small GPT): calibrate on the model you will plan for")
    cal.add_argument("--seqpar", metavar="SAMPLES.json", help="instead of measuring one layer, fit the cost "
                     "model to timed seqpar runtime groups (dtrain/seqpar/calibrate.py; benchmarks/seqpar.py "
                     "writes them) and write --out")
    cal.add_argument("--seqpar-model", metavar="SPEC", help="with --seqpar: the trained model's shape "
                     "(--model syntax of `dtrain plan seqpar`)")
    cal.add_argument("--seqpar-cluster", metavar="FILE", help="with --seqpar: the cluster file to refit "
                     "(default cluster/cpu_local.toml)")
    from dtrain.planner.layout import add_subcommands  # dtrain plan layout / memory (docs/hierarchical.md)

    add_subcommands(sub)
    return parser


def _seqpar(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.cluster) if args.cluster else default_cluster()
    cluster = cluster.with_topology(args.gpus, args.gpus_per_node)
    model = parse_model(args.model)
    lengths = read_lengths(args.lengths) if args.lengths else sample_lengths(args.dist, args.batch, args.seed)
    options = PlannerOptions(max_buckets=args.buckets, time_limit_s=args.time_limit, solver=args.solver)
    result = compare(lengths, CostModel(model, cluster), options)
    if args.json:
        print(json.dumps({"summary": result.to_dict(), "plan": result.plan.to_dict()}, sort_keys=True))
    else:
        print(format_summary(result))
    return 0


def _calibrate_seqpar(args: argparse.Namespace) -> int:
    from dtrain.seqpar import calibrate as runtime  # numpy only

    if not args.seqpar_model:
        raise PlannerError("--seqpar needs --seqpar-model, the shape of the model the samples were timed on "
                           "(e.g. layers=4,hidden=128,heads=4,vocab=256)")
    local = REPO_CLUSTER_DIR / "cpu_local.toml"
    base = load_cluster(args.seqpar_cluster) if args.seqpar_cluster else (
        load_cluster(local) if local.is_file() else default_cluster())
    fit = runtime.fit(runtime.load_samples(args.seqpar))
    spec = runtime.to_cluster(fit, parse_model(args.seqpar_model), base)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(spec.to_toml())
    if args.json:
        print(json.dumps({"out": args.out, **fit.to_dict()}, sort_keys=True))
    else:
        print(f"fitted {fit.samples} seqpar groups: relative residual median {100 * fit.median_rel_residual:.1f}%, "
              f"max {100 * fit.max_rel_residual:.1f}% (by group size: "
              + ", ".join(f"d={d} {100 * r:.1f}%" for d, r in sorted(fit.residual_by_d.items())) + f"); wrote {args.out}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    if args.layout:
        from dtrain.planner.calibrate import calibrate_layout, layout_summary

        if args.out == str(REPO_CLUSTER_DIR / "cpu_local.toml"):
            raise PlannerError("--layout writes a cluster file of its own: pass --out, e.g. cluster/netns_1gbit.toml")
        from dtrain.planner.shapes import parse_model

        model = parse_model(args.model) if args.model else None
        result = calibrate_layout(args.out, nodes=args.nodes, nproc=args.nproc, net=args.net, quick=args.quick,
                                  model=model)
        print(json.dumps({k: v for k, v in result.items() if k != "raw"}, sort_keys=True) if args.json
              else layout_summary(result))
        return 0
    if args.seqpar:
        return _calibrate_seqpar(args)
    from dtrain.planner.calibrate import calibrate  # torch only here

    report = calibrate(out_path=args.out, max_degree=args.max_degree, quick=args.quick)
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    else:
        print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dtrain plan``; returns the process exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "seqpar":
            return _seqpar(args)
        if args.command in ("layout", "memory"):
            from dtrain.planner.layout import run as run_layout

            return run_layout(args)
        return _calibrate(args)
    except _ArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PlannerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # dtrain plan memory: the config's zero section
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
