"""The ``dtrain`` command line: argument parsing, validation and dispatch.

Sub-commands:

* ``dtrain launch [options] script.py [script args...]`` runs the script on
  M simulated nodes x N ranks via :func:`dtrain.launch.local.run_local`, or with ``--ray`` on
  M Ray nodes x N ranks via :func:`dtrain.launch.ray_launch.run_ray`;
* ``dtrain plan ARGS...`` forwards to ``dtrain.planner.cli.main``;
* ``dtrain plot runs/x.jsonl [...] -o x.png`` draws metrics files (:mod:`dtrain.plot`);
* ``dtrain --version``.

Bad input is reported as ``error: ...`` on stderr with exit status 2; a bad config (``--config``
file and every ``--set``, dtrain.launch.preflight) as ``dtrain: config error: ...``, also with exit
status 2, before any rank starts. Launcher options go before the script; everything after the
script path belongs to the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import NoReturn

from dtrain.config import ConfigError
from dtrain.errors import USAGE_EXIT_STATUS, UsageError, usage_line
from dtrain.faults.spec import (
    KINDS as FAULT_KINDS, SYNTAX as FAULT_SYNTAX, FaultSpecError, check_fits, parse_all as parse_faults,
)

__all__ = ["main", "build_parser", "INJECT_KINDS", "UsageError"]

INJECT_KINDS: tuple[str, ...] = tuple(FAULT_KINDS)

_MAIN_COMMAND = "dtrain launch --nproc 2 --set zero.stage=3 --metrics runs/gpt.jsonl examples/train_gpt.py"
_EXAMPLES = f"""examples:
  {_MAIN_COMMAND}
  dtrain launch --nproc 2 --config run.toml train.py --epochs 3     # --epochs 3 goes to train.py
  dtrain launch --nodes 2 --nproc 2 --max-restarts 2 --inject kill:rank=1,step=20 train.py
  dtrain launch --ray --nodes 2 --nproc 2 train.py                  # a private 2-node Ray cluster
  dtrain plan seqpar --help"""
_LAUNCH_ORDER = ("Launcher options go before SCRIPT; everything after SCRIPT is passed to the script "
                 "untouched (in `dtrain launch --nproc 2 train.py --nproc 7` the script gets `--nproc 7`).")
_LAUNCHER_ONLY = ("--nproc", "--nodes", "--max-restarts", "--collective-timeout-s", "--inject", "--net", "--no-progress",
                  "--start-method", "--ray", "--address", "--min-nodes", "--node-wait-s")
"""Launcher options a training script hardly takes itself: after the script they earn a hint."""
_INJECT_KINDS_HELP = "fault kinds (--inject KIND:KEY=VALUE,...; step: the step after which it fires):\n" + "\n".join(
    f"  {FAULT_SYNTAX[kind]}" for kind in INJECT_KINDS)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        message = message.replace("script, script_args", "script")
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dtrain")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for ``dtrain``."""
    parser = _Parser(prog="dtrain", description="dtrain: distributed training toolkit",
                     epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dtrain {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{launch,plan,plot}", parser_class=_Parser)

    launch = sub.add_parser(
        "launch",
        help="run a training script on M simulated nodes x N ranks on this machine",
        description=textwrap.fill(
            "Run SCRIPT on NODES x NPROC local ranks (torch elastic agent, c10d on 127.0.0.1), or with --ray "
            "on NODES Ray nodes. The config (--config, every --set) is checked before any rank starts. "
            + _LAUNCH_ORDER),
        epilog=_EXAMPLES.replace("\n  dtrain plan seqpar --help", "") + "\n\n" + _INJECT_KINDS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    launch.add_argument("--nproc", type=int, default=1, help="ranks per node (default 1)")
    launch.add_argument("--nodes", type=int, default=1, help="simulated nodes (default 1)")
    launch.add_argument("--metrics", metavar="PATH", help="metrics JSONL file rank 0 writes (DTRAIN_METRICS); "
                        "a new run replaces it, restarts of the run append")
    launch.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="a.b=v",
        help="config override, repeatable (DTRAIN_OVERRIDES)",
    )
    launch.add_argument("--config", metavar="FILE", help="config file (DTRAIN_CONFIG)")
    launch.add_argument("--deepspeed-config", metavar="FILE", help="DeepSpeed JSON config, mapped onto dtrain's "
                        "config (on top of --config; --set wins); see docs/deepspeed.md")
    launch.add_argument(
        "--max-restarts", type=int, default=0, metavar="K", help="restart the whole group up to K times"
    )
    launch.add_argument("--collective-timeout-s", type=float, metavar="T",
                        help="a collective that does not finish in T s fails its rank (sets comm.timeout_s, "
                        "default 300; DTRAIN_TIMEOUT_S); not a job time limit")
    launch.add_argument("--timeout-s", dest="old_timeout_s", help=argparse.SUPPRESS)  # renamed: refused with a hint
    launch.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault, repeatable: KIND:KEY=VALUE,... (the kinds are listed below)",
    )
    launch.add_argument(
        "--net",
        metavar="bw=RATE[,latency=T][,burst=B]",
        help="one network namespace per node, inter-node links limited with tc tbf (root; iproute2)",
    )
    launch.add_argument("--no-progress", action="store_true", help="do not draw a progress bar on rank 0")
    launch.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver",
                        help="forkserver (default): ranks are forked from one server that imported torch once; "
                        "spawn: every rank is a fresh interpreter (local launcher; --net always spawns)")
    ray = launch.add_argument_group("Ray", "run on a Ray cluster: each node's NPROC ranks on one Ray node, "
                                    "NODES different Ray nodes (placement group, STRICT_SPREAD)")
    ray.add_argument("--ray", action="store_true", help="launch on Ray (without --address: a private "
                     "NODES-node Ray cluster on this machine, loopback only, for this job)")
    ray.add_argument("--address", metavar="HOST:PORT|auto", help="existing Ray cluster (its GCS address); it "
                     "must enforce Ray token authentication (RAY_AUTH_MODE=token) unless --insecure")
    ray.add_argument("--insecure", action="store_true", help="use --address even if that cluster does not "
                     "require token authentication (see SECURITY.md)")
    ray.add_argument("--min-nodes", type=int, metavar="M", help="after losing nodes, continue on as few as M "
                     "instead of waiting for replacements")
    ray.add_argument("--node-wait-s", type=float, default=60.0, metavar="T",
                     help="how long to wait for enough Ray nodes before failing (default 60)")
    ray.add_argument("--runtime-env", metavar="JSON|FILE", help="Ray runtime env for the job (JSON text or a "
                     ".json file), e.g. '{\"working_dir\": \".\"}'")
    ray.add_argument("--cpus-per-rank", type=float, default=1.0, metavar="C", help="Ray CPUs per rank (default 1)")
    ray.add_argument("--gpus-per-rank", type=float, default=0.0, metavar="G", help="Ray GPUs per rank (default 0)")
    ray.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (local cluster, 127.0.0.1)")
    launch.add_argument("script", help="training script (.py); launcher options go before it")
    launch.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script (all of "
                        "them: a launcher option after the script goes to the script)")

    sub.add_parser("plan", help="plan a parallel layout (see `dtrain plan --help`)", add_help=False)

    plot = sub.add_parser("plot", help="draw metrics files (loss, tokens/s, step time, memory, comm, restarts)",
                          description="One figure of dtrain metrics JSONL files, several runs overlaid.")
    plot.add_argument("files", nargs="+", metavar="METRICS.jsonl", help="metrics files (dtrain launch --metrics)")
    plot.add_argument("-o", "--output", metavar="PNG", help="output image (default: the first file with .png)")
    return parser


def _validate_launch(ns: argparse.Namespace) -> None:
    if ns.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {ns.nproc}")
    if ns.nodes < 1:
        raise UsageError(f"--nodes must be >= 1, got {ns.nodes}")
    if ns.max_restarts < 0:
        raise UsageError(f"--max-restarts must be >= 0, got {ns.max_restarts}")
    if ns.old_timeout_s is not None:
        raise UsageError(f"--timeout-s was renamed: use --collective-timeout-s {ns.old_timeout_s} (it sets the "
                         "collective timeout, comm.timeout_s, not a time limit for the job)")
    if ns.collective_timeout_s is not None and not ns.collective_timeout_s > 0:
        raise UsageError(f"--collective-timeout-s must be a positive number of seconds, got {ns.collective_timeout_s}")
    if not os.path.isfile(ns.script):
        raise UsageError(f"script not found: {ns.script!r}; pass the path of an existing .py file")
    if ns.config is not None and not os.path.isfile(ns.config):
        raise UsageError(f"--config file not found: {ns.config!r}")
    for item in ns.overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} is malformed; use --set section.key=value")
    try:
        faults = parse_faults(ns.inject)
        check_fits(faults, ns.nodes * ns.nproc, ns.nodes, None)
    except FaultSpecError as exc:
        raise UsageError(str(exc)) from None
    net_fault = next((f for f in faults if f.kind == "net"), None)
    if ns.net is None and net_fault is not None:  # `--inject net:bw=R` is `--net bw=R`
        ns.net = ",".join(f"{k}={v}" for k, v in net_fault.params.items())
    if ns.net is not None:
        from dtrain import netns

        try:
            netns.parse_net_spec(ns.net)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        reason = netns.unavailable_reason()
        if reason:
            raise UsageError(f"--net needs network namespaces: {reason}")
    _validate_ray(ns)
    if ns.deepspeed_config is not None:
        _apply_deepspeed(ns)


def _apply_deepspeed(ns: argparse.Namespace) -> None:
    """The DeepSpeed config's mapped settings go to every rank as overrides before the command line's."""
    from dtrain.config import ConfigError
    from dtrain.deepspeed_config import launch_overrides

    try:
        ns.overrides, warning = launch_overrides(ns.deepspeed_config, ns.nodes * ns.nproc, ns.config, ns.overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if warning:
        print(f"dtrain: warning: {warning}", file=sys.stderr)


_RAY_ONLY = ("address", "min_nodes", "runtime_env", "dashboard", "insecure")


def _validate_ray(ns: argparse.Namespace) -> None:
    if not ns.ray:
        given = [f"--{name.replace('_', '-')}" for name in _RAY_ONLY if getattr(ns, name)]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --ray")
        return
    if ns.net is not None:
        raise UsageError("--net builds simulated hosts for the local launcher; for Ray on namespaced hosts "
                         "start cluster/fake_cluster.py and pass its --address")
    if ns.min_nodes is not None and not 1 <= ns.min_nodes <= ns.nodes:
        raise UsageError(f"--min-nodes must be between 1 and --nodes ({ns.nodes}), got {ns.min_nodes}")
    if not ns.node_wait_s > 0:
        raise UsageError(f"--node-wait-s must be a positive number of seconds, got {ns.node_wait_s}")
    if not ns.cpus_per_rank > 0 or ns.gpus_per_rank < 0:
        raise UsageError("--cpus-per-rank must be > 0 and --gpus-per-rank >= 0")
    if ns.address is not None and not ns.address.strip():
        raise UsageError("--address is empty; pass HOST:PORT of the Ray head or auto")
    if ns.insecure and ns.address is None:
        raise UsageError("--insecure applies only with --address (the private cluster always uses token auth)")
    ns.runtime_env = _runtime_env(ns.runtime_env)
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UsageError("--ray needs Ray installed: pip install 'dtrain[ray]'")


def _runtime_env(value: str | None) -> dict | None:
    if value is None:
        return None
    text = value
    if os.path.isfile(value):
        with open(value) as fh:
            text = fh.read()
    try:
        env = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--runtime-env is neither a JSON object nor a readable .json file ({exc.msg})") from None
    if not isinstance(env, dict):
        raise UsageError("--runtime-env must be a JSON object, e.g. '{\"env_vars\": {\"A\": \"1\"}}'")
    if isinstance(env.get("working_dir"), str):
        env["working_dir"] = os.path.abspath(env["working_dir"])
    return env


def _misplaced_launcher_options(script_args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in script_args if a.split("=", 1)[0] in _LAUNCHER_ONLY]


def _launch(ns: argparse.Namespace) -> int:
    _validate_launch(ns)
    from dtrain.launch.preflight import check_config_up_front, metrics_destination

    config = check_config_up_front(ns.config, list(ns.overrides), ns.metrics,  # before any rank or torch
                                   nodes=ns.nodes, nproc=ns.nproc, local=not (ns.ray and ns.address))
    if not ns.ray:
        from dtrain.snapshot.client import check_base_dir

        check_base_dir()  # the shared-memory directory of run state is ours (lstat), before anything starts
    metrics = metrics_destination(config, ns.metrics)
    if metrics is not None:
        print(f"dtrain: metrics -> {metrics} (one JSON line per step; a new run replaces the file, "
              "restarts append)", file=sys.stderr, flush=True)
    status = _run_launch(ns)
    misplaced = _misplaced_launcher_options(ns.script_args)
    if status != 0 and misplaced:
        print(f"dtrain: hint: {' '.join(misplaced)} came after the script, so the script got "
              f"{'it' if len(misplaced) == 1 else 'them'}; launcher options go before the script: "
              f"dtrain launch {misplaced[0]} ... {ns.script} [script args]", file=sys.stderr, flush=True)
    return status


def _run_launch(ns: argparse.Namespace) -> int:
    if ns.ray and ns.address is None:
        # The job's own Ray goes into a private loopback-only network namespace. Without root that
        # takes a user namespace, which only a single-threaded process may create: do it before
        # torch starts threads. Best effort here; run_ray reports it if it cannot be done.
        from dtrain.launch.ray_cluster import isolate_loopback

        isolate_loopback()
    elif ns.net is None and ns.start_method == "forkserver":
        # The fork server imports torch for the ranks while this process imports the agent.
        from dtrain.launch import zygote
        from dtrain.launch.env import process_defaults

        zygote.start(process_defaults(None))
    from dtrain.launch.local import LaunchSpec, run_local

    spec = LaunchSpec(
        script=os.path.abspath(ns.script),
        script_args=list(ns.script_args),
        nproc=ns.nproc,
        nodes=ns.nodes,
        metrics=os.path.abspath(ns.metrics) if ns.metrics else None,
        overrides=list(ns.overrides),
        config=os.path.abspath(ns.config) if ns.config else None,
        max_restarts=ns.max_restarts,
        collective_timeout_s=ns.collective_timeout_s,
        inject=list(ns.inject),
        progress=not ns.no_progress,
        net=ns.net,
        start_method=ns.start_method,
    )
    if ns.ray:
        from dtrain.launch.ray_launch import RaySpec, run_ray

        return run_ray(RaySpec(job=spec, address=ns.address, min_nodes=ns.min_nodes, node_wait_s=ns.node_wait_s,
                               runtime_env=ns.runtime_env, cpus_per_rank=ns.cpus_per_rank,
                               gpus_per_rank=ns.gpus_per_rank, dashboard=ns.dashboard, insecure=ns.insecure),
                       exit_on_signal=True)
    return run_local(spec, exit_on_signal=True)


def _plan(args: list[str]) -> int:
    try:
        from dtrain.planner.cli import main as plan_main
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == "dtrain.planner" or exc.name.startswith("dtrain.planner")):
            raise UsageError("`dtrain plan` is not available: the module dtrain.planner.cli is not installed") from None
        raise
    return int(plan_main(args) or 0)


def _plot(ns: argparse.Namespace) -> int:
    from dtrain.plot import PlotError, plot_files

    try:
        plot_files(ns.files, ns.output)
    except PlotError as exc:
        raise UsageError(str(exc)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dtrain`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "plan":
            return _plan(args[1:])
        parser = build_parser()
        try:
            ns = parser.parse_args(args)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        if ns.command == "launch":
            return _launch(ns)
        if ns.command == "plot":
            return _plot(ns)
        parser.print_help(sys.stderr)
        return 2
    except ConfigError as exc:
        print(usage_line(exc), file=sys.stderr)
        return USAGE_EXIT_STATUS
    except UsageError as exc:
        for line in str(exc).splitlines():  # one line per problem
            print(f"error: {line}", file=sys.stderr)
        return USAGE_EXIT_STATUS


if __name__ == "__main__":
    sys.exit(main())
