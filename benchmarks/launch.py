"""Launch and restart: dtrain local vs dtrain Ray vs Ray Train's TorchTrainer, same script.

    python benchmarks/launch.py                      # all variants, 3 repeats (~10 min on 2 busy cores)
    python benchmarks/launch.py --variants local,ray --repeats 1

Every variant runs examples/train_gpt.py (``--model tiny``, 2 ranks on one node, the same seed,
``checkpoint.every`` steps to a fresh directory) and is measured the same way, from rank 0's
metrics file (polled every 20 ms):

* ``first_step_s``: from starting the launcher process to the first step line;
* at step ``--kill-at`` rank 1 gets SIGKILL; ``resume_s``: from the kill to the first step line
  of the restarted group; ``steps_lost``: the last step logged before the kill minus the step the
  run resumed from (must not exceed the checkpoint interval); the run must still finish all steps.

Variants: ``local`` (``dtrain launch``: torchrun's agent), ``ray`` (``dtrain launch --ray``: its
own Ray cluster, started cold), ``ray-warm`` (``--ray --address`` of a running cluster),
``raytrain`` (``TorchTrainer`` after a cold ``ray.init()``), ``raytrain-warm`` (``TorchTrainer``
on the running cluster); both Ray Train variants restart through ``FailureConfig(max_failures=1)``
and resume from the same dtrain checkpoint directory. ``report_s`` is the mean blocking time of
``ray.train.report()`` measured in a separate small Ray Train run. The whole benchmark runs in a
private network namespace with only loopback (as root), so no Ray server listens beyond it.
Writes benchmarks/results/launch.json. The Ray Train variants need ``pip install 'ray[train]==2.60.0'``
(pandas, pyarrow; not in dtrain's extras).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _bench_util import machine_info, rotated_schedule, summarize, write_json  # noqa: E402

EXAMPLE = str(ROOT / "examples" / "train_gpt.py")
VARIANTS = ("local", "ray", "ray-warm", "raytrain", "raytrain-warm")

# Runs in every rank: record (rank, pid) so the benchmark can kill rank 1, then run the example.
WRAPPER = textwrap.dedent(f"""
    import os, runpy, sys
    open(os.path.join(os.environ["BENCH_PID_DIR"], f"pid.{{os.environ['RANK']}}.{{os.getpid()}}"), "w").close()
    sys.argv = [{EXAMPLE!r}] + sys.argv[1:]
    runpy.run_path({EXAMPLE!r}, run_name="__main__")
""")

# The TorchTrainer driver: the same wrapper as train_loop_per_worker; Ray Train owns the group.
RAYTRAIN = textwrap.dedent("""
    import json, os, runpy, sys
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    cfg = json.loads(sys.argv[1])

    def loop(config):
        os.environ.update(config["env"])
        sys.argv = [config["wrapper"], *config["args"]]
        try:
            runpy.run_path(config["wrapper"], run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise RuntimeError(f"script exited with {exc.code}") from None

    def report_loop(config):
        import time
        t = []
        for i in range(config["n"]):
            t0 = time.perf_counter()
            ray.train.report({"i": i})
            t.append(time.perf_counter() - t0)
        if ray.train.get_context().get_world_rank() == 0:
            with open(config["out"], "w") as fh:
                json.dump(t, fh)

    if cfg["address"]:
        ray.init(address=cfg["address"], log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    fn, loop_cfg = (report_loop, cfg["report"]) if cfg.get("report") else (loop, cfg)
    trainer = TorchTrainer(fn, train_loop_config=loop_cfg,
                           scaling_config=ScalingConfig(num_workers=cfg["world"], use_gpu=False),
                           run_config=RunConfig(storage_path=cfg["storage"], name="bench",
                                                failure_config=FailureConfig(max_failures=cfg["max_failures"])))
    trainer.fit()
""")


def _steps(metrics: Path) -> list[int]:
    """Step numbers of rank 0's step lines, in file order (a resumed run repeats steps)."""
    if not metrics.exists():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "step" in rec and not rec.get("summary"):
            out.append(int(rec["step"]))
    return out


def _resumed_index(steps: list[int], n_before: int, last_before: int) -> int | None:
    """Index of the first line written by the restarted group.

    Rank 0 may still log a step or two after rank 1 is killed; the restarted group starts again
    from its checkpoint, at a step not after the last one logged before the kill.
    """
    for i in range(n_before, len(steps)):
        if steps[i] <= last_before or steps[i] <= steps[i - 1]:
            return i
    return None


def _rank_pid(pid_dir: Path, rank: int) -> int | None:
    pids = [p for p in pid_dir.glob(f"pid.{rank}.*")]
    newest = max(pids, key=lambda p: p.stat().st_mtime, default=None)
    return int(newest.name.split(".")[2]) if newest else None


def run_once(variant: str, args: argparse.Namespace, address: str | None, work: Path) -> dict[str, Any]:
    """One launch with one SIGKILL of rank 1; the timings of that run."""
    work.mkdir(parents=True)
    metrics, pid_dir, ckpt = work / "m.jsonl", work / "pids", work / "ckpt"
    pid_dir.mkdir()
    wrapper = work / "wrapper.py"
    wrapper.write_text(WRAPPER)
    script_args = ["--model", "tiny", "--steps", str(args.steps), "--batch-size", "8", "--seed", "1"]
    sets = [f'checkpoint.dir="{ckpt}"', f"checkpoint.every={args.every}"]
    env = {**os.environ, "BENCH_PID_DIR": str(pid_dir)}
    if variant.startswith("raytrain"):
        contract = {"DTRAIN_NODES": "1", "DTRAIN_NPROC": str(args.world), "DTRAIN_METRICS": str(metrics),
                    "DTRAIN_OVERRIDES": json.dumps(sets), "DTRAIN_PROGRESS": "0", "OMP_NUM_THREADS": "1",
                    "BENCH_PID_DIR": str(pid_dir)}
        cfg = {"address": address, "world": args.world, "storage": str(work / "storage"), "max_failures": 1,
               "wrapper": str(wrapper), "args": script_args, "env": contract}
        (work / "driver.py").write_text(RAYTRAIN)
        cmd = [sys.executable, str(work / "driver.py"), json.dumps(cfg)]
    else:
        cmd = [sys.executable, "-m", "dtrain.launch.cli", "launch", "--nproc", str(args.world), "--no-progress",
               "--max-restarts", "1", "--metrics", str(metrics)]
        cmd += [x for s in sets for x in ("--set", s)]
        if variant.startswith("ray"):
            cmd += ["--ray"]
            if variant == "ray-warm":  # an existing cluster's nodes do not see this process's environment
                cmd += ["--address", address, "--runtime-env",
                        json.dumps({"env_vars": {"BENCH_PID_DIR": str(pid_dir)}})]
        cmd += [str(wrapper), *script_args]
    log = open(work / "launcher.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    out: dict[str, Any] = {"variant": variant}
    try:
        deadline = t0 + args.timeout_s
        first = killed_at = None
        last_before = 0
        while time.monotonic() < deadline and proc.poll() is None:
            steps = _steps(metrics)
            now = time.monotonic()
            if steps and first is None:
                first = now
                out["first_step_s"] = round(now - t0, 3)
            if killed_at is None and steps and max(steps) >= args.kill_at:
                pid = _rank_pid(pid_dir, 1)
                if pid:
                    last_before, n_before = max(steps), len(steps)
                    os.kill(pid, signal.SIGKILL)
                    killed_at = time.monotonic()
            elif killed_at is not None and (i := _resumed_index(steps, n_before, last_before)) is not None:
                out["resume_s"] = round(now - killed_at, 3)
                out["resumed_from"] = steps[i] - 1
                out["last_step_before_kill"] = max(steps[:i])
                out["steps_lost"] = out["last_step_before_kill"] - out["resumed_from"]
                break
            time.sleep(0.02)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        steps = _steps(metrics)
        out["finished"] = rc == 0 and bool(steps) and max(steps) == args.steps
        out["rc"] = rc
    except subprocess.TimeoutExpired:
        out["finished"], out["rc"] = False, None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    if not out.get("finished"):
        out["log_tail"] = (work / "launcher.log").read_text()[-2000:]
    return out


def measure_report(address: str, work: Path, n: int = 10) -> list[float]:
    """Blocking time of each ``ray.train.report()`` call (no checkpoint) in a 2-worker run."""
    work.mkdir(parents=True)
    (work / "driver.py").write_text(RAYTRAIN)
    cfg = {"address": address, "world": 2, "storage": str(work / "storage"), "max_failures": 0,
           "report": {"n": n, "out": str(work / "report.json")}}
    subprocess.run([sys.executable, str(work / "driver.py"), json.dumps(cfg)], cwd=ROOT, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = work / "report.json"
    return json.loads(path.read_text()) if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=10, help="checkpoint interval (steps)")
    p.add_argument("--kill-at", type=int, default=25)
    p.add_argument("--timeout-s", type=float, default=240)
    p.add_argument("--out", default=str(HERE / "results" / "launch.json"))
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    from dtrain.launch.ray_cluster import FAST_HEALTH_CHECKS, isolate_loopback

    load_start = os.getloadavg()
    reason = isolate_loopback()
    if reason:
        print(f"benchmark: cannot isolate the network ({reason}); Ray will listen on this machine's interfaces",
              file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="dtr-b", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                      RAY_TMPDIR=str(tmp), RAY_TRAIN_ENABLE_PRINT_PATCH="0")
    (tmp / "ray").mkdir()
    # Only now: importing Ray Train reads RAY_AUTH_MODE, which must already say "token".
    if any(v.startswith("raytrain") for v in variants):
        try:
            import ray.train.torch  # noqa: F401
        except ImportError as exc:
            p.error(f"the raytrain variants need Ray Train ({exc}); pip install 'ray[train]==2.60.0' "
                    "or pass --variants local,ray,ray-warm")
    cluster = None
    results: list[dict[str, Any]] = []
    report: list[float] = []
    try:
        address = None
        if any(v.endswith("-warm") for v in variants):
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 4, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                "_system_config": FAST_HEALTH_CHECKS, "temp_dir": str(tmp / "ray")})
            address = cluster.address
        for i, (rep, variant) in enumerate(rotated_schedule(variants, args.repeats)):
            addr = address if variant.endswith("-warm") else None
            res = run_once(variant, args, addr, tmp / f"run{i}-{variant}")
            res["repeat"] = rep
            results.append(res)
            print(json.dumps(res), flush=True)
        if address and "raytrain-warm" in variants:
            report = measure_report(address, tmp / "report")
    finally:
        if cluster is not None:
            cluster.shutdown()
    summary = {}
    for v in variants:
        runs = [r for r in results if r["variant"] == v]
        summary[v] = {key: summarize([r[key] for r in runs if key in r])
                      for key in ("first_step_s", "resume_s", "steps_lost")}
        summary[v]["finished"] = sum(bool(r.get("finished")) for r in runs)
        summary[v]["runs"] = len(runs)
    out = {"command": " ".join([sys.executable, *sys.argv]), "machine": machine_info(["ray"]),
           "load_avg_start": load_start, "params": vars(args), "runs": results, "summary": summary,
           "ray_train_report_s": summarize(report) if report else None,
           "targets": {"local_first_step_s": 5, "ray_first_step_s": 12, "resume_s": 10,
                       "steps_lost_max": args.every}}
    out["load_avg_end"] = os.getloadavg()
    write_json(args.out, out)
    print(json.dumps(summary, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
