"""In-memory snapshots (issue 4) vs no snapshots vs synchronous torch.save vs DCP async_save.

    python benchmarks/snapshot.py            # 4 variants x 3 repeats + 4 fault runs, ~30 min on 2 busy cores
    python benchmarks/snapshot.py --quick    # smoke run: few steps, 1 repeat, the kill fault only

Owns the snapshot benchmark: every run is ``dtrain launch --nodes 2 --nproc 2`` (world 4, two
simulated nodes, ZeRO-3) of examples/train_gpt.py with the same model, seed, batches and steps:

* ``none``: no snapshots (the limit);
* ``dtrain``: ``snapshot.enabled = true``, a snapshot every step (k = 1 data + m = 1 parity node);
* ``torch_save``: synchronous ``torch.save`` of the same per-rank state to disk every step;
* ``dcp_async``: ``torch.distributed.checkpoint.async_save`` of that state every step;
* ``dtrain_ab``: one longer run (``--ab-steps``) whose steps alternate between windows of
  ``--ab-window`` steps with dtrain snapshots every step and windows without any. The overhead is
  the median step time of the "on" steps over that of the "off" steps, leaving out the first two
  steps of every window (a snapshot's background work lands in the next step, and the next one may
  still be finishing). Both halves share the machine's conditions of the same few seconds, which
  separate runs on a shared VM do not (the ``none`` runs alone spread by 10-25 % here).

The two disk variants run benchmarks/_snapshot_worker.py (train_gpt.main plus a plugin that saves
after every step) so every variant writes the same metrics JSONL. The timed variants run
``--repeats`` times, interleaved in a rotated order (the machine is shared and noisy); per run
the figures are medians over the steps after ``--warmup``, per variant the median over repeats
(min and max kept). Blocking time is ``plugins.snapshot_block_s`` of rank 0; throughput is
``tokens_per_s``; overheads are against ``none`` (ratio of medians, and the median of the
per-pass paired ratios). During ``dtrain`` runs a monitor asks each node's snapshot process for
its ``usage`` and sizes its shared-memory slot files, for the measured memory overhead.

Then one run per fault kind (``kill``, ``node-loss``, ``corrupt``, ``hang``; ``--max-restarts 1``,
snapshots on) reads the restart event (``recovery_s``, ``restore_s``, ``resumed_from_step``,
``source``) and checks that the run ends with the fault-free ``param_sha256``. Disk checkpoints
go to a temporary directory (on this machine a host-cached virtio disk). Writes
benchmarks/results/snapshot.json and snapshot.png (``--out`` changes the prefix).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _bench_util import (BarPanel, machine_info, median_or_none, rotated_schedule, safe_ratio,  # noqa: E402
                         summarize, write_bar_png, write_json)

VARIANTS = ("none", "dtrain", "torch_save", "dcp_async")
AB = "dtrain_ab"
AB_SKIP = 2  # leading steps of every A/B window left out (spill-over from the window before)
FAULTS = {"kill": "kill:rank=1,step={step}", "node-loss": "node-loss:node=1,step={step}",
          "corrupt": "corrupt:rank=2,step={step}", "hang": "hang:rank=3,step={step}"}
NODES, NPROC = 2, 2
TARGETS = {"throughput_overhead_max": 0.03, "block_ratio_vs_torch_save_min": 14.0, "kill_resume_s_max": 10.0}
MACHINE_NOTE = ("2 CPU cores shared with other engineers' test and benchmark runs while this ran "
                "(load average in 'load_avg'); figures are medians of interleaved repeats")


# ------------------------------------------------------------------------------ one launch
def launch_cmd(script_args: list[str], sets: list[str], inject: str | None = None) -> list[str]:
    """``dtrain launch`` at world 4 (2 nodes x 2 ranks) of ``script_args`` with config ``sets``."""
    cmd = [sys.executable, "-m", "dtrain.launch.cli", "launch", "--nodes", str(NODES), "--nproc", str(NPROC),
           "--no-progress"]
    if inject:
        cmd += ["--max-restarts", "1", "--inject", inject]
    cmd += [x for s in sets for x in ("--set", s)]
    return cmd + script_args


def run_launch(cmd: list[str], log: Path, timeout_s: float) -> dict[str, Any]:
    """Run one launcher in its own session; on timeout (or our own SIGTERM) stop it, then its group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _stop_group(proc)
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_s": time.monotonic() - t0}


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the launcher (it stops its ranks and snapshot processes), then SIGKILL its group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL (a torn last line is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "step" in r and "event" not in r and not r.get("summary")]


def summary_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    return next((r for r in reversed(records) if r.get("summary")), {})


# ------------------------------------------------------------------------------ memory monitor
class SnapshotMemoryMonitor:
    """Samples each node's snapshot process (``usage``, CPU time) and its /dev/shm slot files during a run."""

    def __init__(self, run_id: str, nodes: int, period_s: float = 1.0) -> None:
        self.run_id, self.nodes, self.period_s = run_id, nodes, period_s
        self.peak: dict[int, dict[str, int]] = {n: {} for n in range(nodes)}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "SnapshotMemoryMonitor":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        import psutil

        from dtrain.snapshot.client import DaemonClient, daemon_pid, node_dir, run_dir

        dirs = [node_dir(run_dir(self.run_id), n) for n in range(self.nodes)]
        clients: dict[int, DaemonClient] = {}
        try:
            while not self.stop.wait(self.period_s):
                for n, d in enumerate(dirs):
                    sample = _slot_bytes(d)
                    pid = daemon_pid(d)
                    if pid is not None:
                        try:
                            cpu = psutil.Process(pid).cpu_times()
                            sample["daemon_cpu_ms"] = int((cpu.user + cpu.system) * 1e3)
                        except psutil.Error:
                            pass
                        try:
                            client = clients.setdefault(n, DaemonClient(d))
                            usage = client.call("usage", _wait=5.0)
                            sample.update(data_bytes=int(usage["data_bytes"]), parity_bytes=int(usage["parity_bytes"]))
                        except Exception:  # noqa: BLE001 - starting or stopping: skip this sample
                            clients.pop(n, None)
                    peak = self.peak[n]
                    if "daemon_cpu_ms" in sample:  # CPU spent before the first sample: start-up, not snapshots
                        peak.setdefault("daemon_cpu_first_ms", sample["daemon_cpu_ms"])
                    for key, value in sample.items():
                        peak[key] = max(peak.get(key, 0), value)
        finally:
            for c in clients.values():
                c.close()

    def result(self) -> dict[str, Any]:
        """Per node peaks and the measured overhead: (shm slots + parity) / the node's state bytes."""
        nodes = {}
        for n, p in self.peak.items():
            state = p.get("slot0_bytes", 0)  # one slot per rank holds exactly that rank's blob
            held = p.get("slot_bytes", 0) + p.get("parity_bytes", 0)
            nodes[str(n)] = {**p, "state_bytes": state,
                             "shm_over_state": safe_ratio(p.get("slot_bytes"), state),
                             "parity_over_state": safe_ratio(p.get("parity_bytes"), state),
                             "held_over_state": safe_ratio(held, state)}
        return nodes


def _slot_bytes(directory: Path) -> dict[str, int]:
    """Apparent and allocated bytes of the node's shared-memory slot files."""
    size = alloc = slot0 = 0
    for p in directory.glob("r*.slot*"):
        try:
            st = p.stat()
        except OSError:
            continue
        size += st.st_size
        alloc += st.st_blocks * 512
        slot0 += st.st_size if p.name.endswith(".slot0") else 0
    return {"slot_bytes": size, "slot_allocated_bytes": alloc, "slot0_bytes": slot0}


# ------------------------------------------------------------------------------ runs
def train_args(args: argparse.Namespace, metrics: Path, steps: int | None = None) -> list[str]:
    return ["--steps", str(steps or args.steps), "--model", args.model, "--batch-size", str(args.batch_size),
            "--seed", str(args.seed), "--metrics", str(metrics)]


def run_variant(variant: str, rep: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One fault-free run of ``variant``; per-run medians over the steps after the warm-up."""
    name = f"{variant}-{rep}"
    metrics, saves = work / f"{name}.jsonl", work / "saves" / name
    sets = ["zero.stage=3"]
    script = [str(ROOT / "examples" / "train_gpt.py")]
    n_steps = args.ab_steps if variant == AB else args.steps
    run_id = None
    if variant in ("dtrain", AB):
        run_id = f"snapbench-{uuid.uuid4().hex[:12]}"
        sets += ["snapshot.enabled=true", f'snapshot.run_id="{run_id}"']
    if variant in ("torch_save", "dcp_async", AB):
        script = [str(HERE / "_snapshot_worker.py"), "--method", "snapshot_ab" if variant == AB else variant,
                  "--save-dir", str(saves), "--ab-window", str(args.ab_window), "--"]
    cmd = launch_cmd(script + train_args(args, metrics, n_steps), sets)
    monitor = SnapshotMemoryMonitor(run_id, NODES) if run_id else None
    try:
        if monitor:
            with monitor:
                outcome = run_launch(cmd, work / f"{name}.log", args.timeout_s)
        else:
            outcome = run_launch(cmd, work / f"{name}.log", args.timeout_s)
    finally:
        shutil.rmtree(saves, ignore_errors=True)
        if run_id:
            from dtrain.snapshot.client import remove_run

            remove_run(run_id)
    records = read_metrics(metrics)
    steps = [r for r in step_records(records) if r["step"] > args.warmup]
    plugins = [r.get("plugins", {}) for r in steps]
    run = {"variant": variant, "repeat": rep, **outcome,
           "ok": outcome["rc"] == 0 and len(step_records(records)) == n_steps,
           "steps_measured": len(steps),
           "block_s": median_or_none(p.get("snapshot_block_s") for p in plugins),
           "save_call_s": median_or_none(p.get("save_call_s") for p in plugins),
           "prepare_s": median_or_none(p.get("prepare_s") for p in plugins),
           "step_time_s": median_or_none(r["step_time_s"] for r in steps),
           "tokens_per_s": median_or_none(r["tokens_per_s"] for r in steps),
           "snapshot_bytes": max((int(p.get("snapshot_bytes", 0)) for p in plugins), default=None),
           "memory_overhead_k_m": next((p["snapshot_memory_overhead"] for p in plugins
                                        if "snapshot_memory_overhead" in p), None),
           "state_bytes": steps[-1]["state_bytes"] if steps else None,
           "param_sha256": summary_record(records).get("param_sha256")}
    if monitor:
        run["memory"] = monitor.result()
    if variant == AB:
        run.update(ab_split(steps_all := step_records(records), args.ab_window))
        run["block_s"] = median_or_none(r.get("plugins", {}).get("snapshot_block_s") for r in steps_all
                                        if _ab_measured(r["step"], args.ab_window, on=True))
    if not run["ok"]:
        run["log_tail"] = (work / f"{name}.log").read_text(errors="replace")[-2500:]
    return run


def _ab_measured(step: int, window: int, on: bool) -> bool:
    """Whether ``step`` is measured as an "on" (``on``) or "off" step of the A/B run."""
    return step >= window and (step // window) % 2 == (0 if on else 1) and step % window >= AB_SKIP


def ab_split(records: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """Median step time of the measured "on" and "off" steps of one A/B run (the first window,
    warm-up, left out), the overhead on/off - 1, and the same ratio for every "off" window and
    the "on" window right after it (``ab_pairs``: neighbours share the machine's conditions)."""
    on = median_or_none(r["step_time_s"] for r in records if _ab_measured(r["step"], window, True))
    off = median_or_none(r["step_time_s"] for r in records if _ab_measured(r["step"], window, False))
    by_window: dict[int, list[float]] = {}
    for r in records:
        if _ab_measured(r["step"], window, True) or _ab_measured(r["step"], window, False):
            by_window.setdefault(r["step"] // window, []).append(r["step_time_s"])
    pairs = [statistics.median(by_window[w + 1]) / statistics.median(by_window[w]) - 1.0
             for w in sorted(by_window) if w % 2 == 1 and w + 1 in by_window]
    return {"ab_on_step_s": on, "ab_off_step_s": off,
            "ab_overhead": None if not on or not off else on / off - 1.0, "ab_pairs": pairs,
            "ab_steps_measured": sum(_ab_measured(r["step"], window, o) for r in records for o in (True, False))}


def run_fault(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One run with ``kind`` injected after step ``--fault-step``: its restart event and final hash."""
    metrics = work / f"fault-{kind}.jsonl"
    spec = FAULTS[kind].format(step=args.fault_step)
    sets = ["zero.stage=3", "snapshot.enabled=true"] + (["comm.timeout_s=5"] if kind == "hang" else [])
    cmd = launch_cmd([str(ROOT / "examples" / "train_gpt.py"), *train_args(args, metrics)], sets, inject=spec)
    outcome = run_launch(cmd, work / f"fault-{kind}.log", args.timeout_s + 120)
    records = read_metrics(metrics)
    restart = next((r for r in records if r.get("event") == "restart"), {})
    fault = next((r for r in records if r.get("event") == "fault"), {})
    summary = summary_record(records)
    out = {"kind": kind, "spec": spec, **outcome, "ok": outcome["rc"] == 0 and bool(summary),
           "fault_event": bool(fault), "restarts": summary.get("restarts"),
           "cause": restart.get("cause"), "source": restart.get("source"),
           "resumed_from_step": restart.get("resumed_from_step"),
           "steps_lost": (args.fault_step - restart["resumed_from_step"]
                          if "resumed_from_step" in restart else None),
           **{k: restart.get(k) for k in ("recovery_s", "restore_s", "noticed_s")},
           "param_sha256": summary.get("param_sha256")}
    if all(out[k] is not None for k in ("recovery_s", "restore_s", "noticed_s")):  # new processes up to the restore
        out["relaunch_s"] = out["recovery_s"] - out["restore_s"] - out["noticed_s"]
    if not out["ok"] or not restart:
        out["log_tail"] = (work / f"fault-{kind}.log").read_text(errors="replace")[-2500:]
    return out


# ------------------------------------------------------------------------------ copy scaling
def copy_scaling(sizes_mib: list[float], repeats: int, disk_dir: Path) -> list[dict[str, Any]]:
    """The copy alone, in this process: dtrain's blob write into a /dev/shm slot vs ``torch.save``.

    A component figure, not a training run: no capture, no snapshot-process round trips. It shows
    how the two blocking copies scale with the per-rank state (the example's is ~2.4 MiB).
    """
    import mmap

    import torch

    from _snapshot_worker import torch_save_atomic
    from dtrain.checkpoint import Flat, RankState
    from dtrain.snapshot import blob as blobs

    torch.set_num_threads(1)  # as in every rank
    shm = Path(tempfile.mkdtemp(prefix="snapbench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    out = []
    try:
        for mib in sizes_mib:
            numel = int(mib * 2**20) // 4
            parts = [torch.randn(numel // 4) for _ in range(4)]
            state = RankState({f"t{i}": Flat.of(t) for i, t in enumerate(parts)}, {}, {"step": 0}, {})
            slot, target = shm / "slot", disk_dir / "rank.pt"
            times: dict[str, list[float]] = {"dtrain_copy": [], "torch_save": [], "torch_save_fsync": []}
            for _ in range(repeats):
                t0 = time.perf_counter()
                plan = blobs.plan(state, 0, 0, "bench")
                fd = os.open(slot, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    if os.fstat(fd).st_size != plan.nbytes:
                        os.ftruncate(fd, plan.nbytes)
                    with mmap.mmap(fd, plan.nbytes) as mm:
                        blobs.write(mm, state, plan)
                finally:
                    os.close(fd)
                t1 = time.perf_counter()
                torch_save_atomic({k: f.tensor() for k, f in state.tensors.items()}, target)
                t2 = time.perf_counter()
                torch_save_atomic({k: f.tensor() for k, f in state.tensors.items()}, target, fsync=True)
                t3 = time.perf_counter()
                times["dtrain_copy"].append(t1 - t0)
                times["torch_save"].append(t2 - t1)
                times["torch_save_fsync"].append(t3 - t2)
            med = {k: statistics.median(v) for k, v in times.items()}
            out.append({"state_mib": mib, "dtrain_copy_s": med["dtrain_copy"], "torch_save_s": med["torch_save"],
                        "torch_save_fsync_s": med["torch_save_fsync"],
                        "ratio": safe_ratio(med["torch_save"], med["dtrain_copy"]),
                        "ratio_fsync": safe_ratio(med["torch_save_fsync"], med["dtrain_copy"]), "repeats": repeats})
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ figures
def variant_summary(runs: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Per-variant medians over repeats, overheads vs ``none`` and blocking ratios vs ``dtrain``."""
    by = {v: [r for r in runs if r["variant"] == v and r["ok"]] for v in VARIANTS}
    out: dict[str, Any] = {}
    limit_tput = median_or_none(r["tokens_per_s"] for r in by["none"])
    limit_step = median_or_none(r["step_time_s"] for r in by["none"])
    for v, rs in by.items():
        tput = median_or_none(r["tokens_per_s"] for r in rs)
        block = median_or_none(r["block_s"] for r in rs)
        paired = []
        for rep in range(repeats):
            mine = [r for r in rs if r["repeat"] == rep]
            base = [r for r in by["none"] if r["repeat"] == rep]
            if mine and base:
                paired.append(1.0 - mine[0]["tokens_per_s"] / base[0]["tokens_per_s"])
        ratio = safe_ratio(tput, limit_tput)
        out[v] = {"runs_ok": len(rs), "block_s": summarize([r["block_s"] for r in rs if r["block_s"] is not None]),
                  "save_call_s": median_or_none(r["save_call_s"] for r in rs),
                  "step_time_s": summarize([r["step_time_s"] for r in rs]),
                  "tokens_per_s": summarize([r["tokens_per_s"] for r in rs]),
                  "throughput_overhead": None if ratio is None else 1.0 - ratio,
                  "throughput_overhead_paired_median": median_or_none(paired),
                  "block_share_of_limit_step": safe_ratio(block, limit_step)}
    dt_block = out["dtrain"]["block_s"]["median"]
    out["ratios"] = {f"{v}_block_over_dtrain": safe_ratio(out[v]["block_s"]["median"], dt_block)
                     for v in ("torch_save", "dcp_async")}
    return out


def ab_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The A/B runs: the median over all their window pairs with a bootstrap 95 % interval of
    that median (``pairs``), the per-run overheads (median, min-max), on/off step times."""
    rs = [r for r in runs if r["variant"] == AB and r["ok"] and r.get("ab_overhead") is not None]
    pairs = [x for r in rs for x in r.get("ab_pairs", [])]
    return {"runs_ok": len(rs), "pairs": {**summarize(pairs), "ci95": _bootstrap_median_ci(pairs)},
            "overhead": summarize([r["ab_overhead"] for r in rs]),
            "on_step_s": summarize([r["ab_on_step_s"] for r in rs]),
            "off_step_s": summarize([r["ab_off_step_s"] for r in rs]),
            "block_s": summarize([r["block_s"] for r in rs if r["block_s"] is not None])}


def _bootstrap_median_ci(values: list[float], rounds: int = 2000, seed: int = 0) -> list[float] | None:
    """2.5th and 97.5th percentiles of the median of ``values`` resampled with replacement."""
    if len(values) < 5:
        return None
    import numpy as np

    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    medians = np.median(rng.choice(data, size=(rounds, data.size), replace=True), axis=1)
    return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


def memory_summary(runs: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """(k+m)/k and what the monitor measured (medians over nodes and dtrain runs)."""
    dt = [r for r in runs if r["variant"] == "dtrain" and r["ok"]]
    per_node = [n for r in dt for n in r.get("memory", {}).values() if n.get("state_bytes")]
    cpu = median_or_none(n["daemon_cpu_ms"] - n["daemon_cpu_first_ms"] for n in per_node if "daemon_cpu_ms" in n)
    return {"snapshot_process_cpu_s_per_step": None if cpu is None else cpu / 1e3 / steps,
            "k_plus_m_over_k": next((r["memory_overhead_k_m"] for r in dt), None),
            "rank_blob_bytes": max((r["snapshot_bytes"] or 0 for r in dt), default=None),
            "rank_state_bytes": dt[0]["state_bytes"] if dt else None,
            "node_state_bytes": median_or_none(n["state_bytes"] for n in per_node),
            "node_shm_slot_bytes": median_or_none(n.get("slot_bytes") for n in per_node),
            "node_parity_bytes": median_or_none(n.get("parity_bytes") for n in per_node),
            "shm_over_state": median_or_none(n["shm_over_state"] for n in per_node),
            "parity_over_state": median_or_none(n["parity_over_state"] for n in per_node),
            "held_over_state": median_or_none(n["held_over_state"] for n in per_node)}


def targets(variants: dict[str, Any], ab: dict[str, Any], faults: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets. The throughput overhead is judged on the in-run A/B estimate when it
    ran (separate runs cannot resolve 3 % on a machine where identical runs spread by more)."""
    paired = variants["dtrain"]["throughput_overhead_paired_median"]
    ratio = variants["ratios"]["torch_save_block_over_dtrain"]
    kill = next((f for f in faults if f["kind"] == "kill"), {})
    resumed = kill.get("recovery_s")
    limit = variants["none"]["tokens_per_s"]
    spread = safe_ratio(None if limit["max"] is None else limit["max"] - limit["min"], limit["median"])
    share = variants["dtrain"]["block_share_of_limit_step"]
    in_run = ab["pairs"]["median"]
    over = in_run if in_run is not None else paired
    resolvable = in_run is not None or (spread is not None and spread <= TARGETS["throughput_overhead_max"])
    return {"throughput_overhead": {"value": over, "target": f"<= {TARGETS['throughput_overhead_max']:.0%}",
                                    "estimator": "in-run A/B, median of all window pairs" if in_run is not None
                                    else "separate runs, median of paired ratios",
                                    "met": None if over is None or not resolvable
                                    else over <= TARGETS["throughput_overhead_max"],
                                    "in_run_ab_pairs": ab["pairs"], "in_run_ab_runs": ab["overhead"],
                                    "separate_runs_paired": paired,
                                    "separate_runs_medians": variants["dtrain"]["throughput_overhead"],
                                    "limit_repeat_spread": spread, "blocking_share_of_limit_step": share,
                                    "note": None if resolvable else
                                    "not resolvable here: the no-snapshot repeats alone spread by more than the "
                                    "target; blocking_share_of_limit_step is the direct cost"},
            "block_ratio_vs_torch_save": {"value": ratio, "target": f">= {TARGETS['block_ratio_vs_torch_save_min']:g}x",
                                          "met": None if ratio is None
                                          else ratio >= TARGETS["block_ratio_vs_torch_save_min"]},
            "kill_resumed_s": {"value": resumed, "target": f"<= {TARGETS['kill_resume_s_max']:g} s",
                               "met": None if resumed is None else resumed <= TARGETS["kill_resume_s_max"]},
            "faults_bit_exact": {"value": [f["kind"] for f in faults if f.get("bit_exact")],
                                 "target": "every fault kind", "met": bool(faults) and all(f.get("bit_exact")
                                                                                          for f in faults)}}


def plot(results: dict[str, Any], path: Path) -> None:
    v = results["variants"]

    def series(key: str, scale: float = 1.0, names: tuple[str, ...] = VARIANTS
               ) -> tuple[list[float | None], list[tuple[float, float] | None]]:
        vals, errs = [], []
        for name in names:
            s = v[name][key]
            vals.append(None if s["median"] is None else s["median"] * scale)
            errs.append(None if s["min"] is None else (s["min"] * scale, s["max"] * scale))
        return vals, errs

    saving = VARIANTS[1:]  # "none" blocks for nothing
    block, block_err = series("block_s", 1e3, saving)
    tput, tput_err = series("tokens_per_s")
    faults = results["faults"]
    panels = [BarPanel("blocking time per step (median over steps; bars: median of repeats, min-max)", "ms",
                       list(saving), {"blocking": block}, {"blocking": block_err}),
              BarPanel("throughput (median tokens/s per run)", "tokens/s", list(VARIANTS),
                       {"tokens/s": tput}, {"tokens/s": tput_err})]
    if faults:
        panels.append(BarPanel("recovery after each fault kind (from the fault to the restored state)", "s",
                               [f["kind"] for f in faults],
                               {"recovery_s": [f.get("recovery_s") for f in faults],
                                "restore_s": [f.get("restore_s") for f in faults]}))
    if results["copy_scaling"]:
        sc = results["copy_scaling"]
        panels.append(BarPanel("the copy alone, in-process (dtrain blob into /dev/shm vs torch.save to disk)", "ms",
                               [f"{c['state_mib']:g} MiB" for c in sc],
                               {"dtrain copy": [c["dtrain_copy_s"] * 1e3 for c in sc],
                                "torch.save": [c["torch_save_s"] * 1e3 for c in sc],
                                "torch.save + fsync": [c["torch_save_fsync_s"] * 1e3 for c in sc]}))
    write_bar_png(path, panels, suptitle=f"dtrain snapshots, world 4 (2 nodes x 2 ranks, ZeRO-3), "
                                         f"{results['settings']['steps']} steps, shared 2-core machine")


def markdown(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md tables of a results JSON (``--markdown PATH`` prints them)."""
    v, mem = results["variants"], results["memory"]

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    def spread(s: dict[str, Any], scale: float, fmt: str) -> str:
        if s["median"] is None:
            return "-"
        return f"{s['median'] * scale:{fmt}} ({s['min'] * scale:{fmt}}-{s['max'] * scale:{fmt}})"

    dt = v["dtrain"]["block_s"]["median"]
    ab = results.get("ab")
    lines = ["| variant | blocking per step, ms | blocking vs dtrain | tokens/s | overhead vs none "
             "(medians / paired) | blocking / limit step time |", "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        x = v[name]
        lines.append(f"| {name} | {spread(x['block_s'], 1e3, '.1f')} | "
                     f"{num(safe_ratio(x['block_s']['median'], dt), '.2f') if name != 'none' else '-'} | "
                     f"{spread(x['tokens_per_s'], 1, '.0f')} | {num(x['throughput_overhead'], '+.1%')} / "
                     f"{num(x['throughput_overhead_paired_median'], '+.1%')} | "
                     f"{num(x['block_share_of_limit_step'], '.1%') if name != 'none' else '-'} |")
    if ab and ab["runs_ok"] and "pairs" in ab:
        settings = results["settings"]
        lines += ["", f"In-run A/B ({ab['runs_ok']} runs of {settings.get('ab_steps')} steps, windows of "
                      f"{settings.get('ab_window')} steps, first {AB_SKIP} of each window left out): step time "
                      f"{spread(ab['on_step_s'], 1e3, '.1f')} ms with snapshots every step vs "
                      f"{spread(ab['off_step_s'], 1e3, '.1f')} ms without (medians of runs, min-max); "
                      f"overhead {num(ab['pairs']['median'], '+.1%')} over {ab['pairs']['n']} window pairs "
                      f"(bootstrap 95 % interval of that median "
                      f"{'n/a' if not ab['pairs']['ci95'] else ' to '.join(format(x, '+.1%') for x in ab['pairs']['ci95'])}), "
                      f"per run {spread(ab['overhead'], 100, '+.1f')} %."]
    lines += ["", "| fault | restored from | resumed from step | steps lost | noticed, s | relaunch, s | restore, s | "
              "recovery (fault to restored), s | bit-exact |", "|---|---|---|---|---|---|---|---|---|"]
    for f in results["faults"]:
        lines.append(f"| `{f['spec']}` | {f.get('source') or 'failed'} | {f.get('resumed_from_step')} | "
                     f"{f.get('steps_lost')} | {num(f.get('noticed_s'), '.2f')} | {num(f.get('relaunch_s'), '.1f')} | "
                     f"{num(f.get('restore_s'), '.2f')} | {num(f.get('recovery_s'), '.1f')} | {f.get('bit_exact')} |")
    lines += ["", f"Memory: (k+m)/k = {mem['k_plus_m_over_k']}; per node: state "
              f"{num((mem['node_state_bytes'] or 0) / 2**20, '.2f')} MiB, shared-memory slots "
              f"{num(mem['shm_over_state'], '.2f')}x, parity held {num(mem['parity_over_state'], '.2f')}x, "
              f"total {num(mem['held_over_state'], '.2f')}x the state; snapshot-process CPU "
              f"{num(mem.get('snapshot_process_cpu_s_per_step'), '.3f')} s per step per node."]
    if results["copy_scaling"]:
        lines += ["", "| per-rank state | dtrain copy, ms | torch.save, ms (ratio) | torch.save + fsync, ms (ratio) |",
                  "|---|---|---|---|"]
        lines += [f"| {c['state_mib']:g} MiB | {c['dtrain_copy_s'] * 1e3:.1f} | {c['torch_save_s'] * 1e3:.1f} "
                  f"({num(c['ratio'], '.1f')}x) | {c['torch_save_fsync_s'] * 1e3:.1f} ({num(c['ratio_fsync'], '.1f')}x) |"
                  for c in results["copy_scaling"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 1 repeat, kill fault only")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3, help="leading steps left out of the medians")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fault-step", type=int, help="step after which faults fire (default steps // 2)")
    p.add_argument("--variants", default=",".join(VARIANTS + (AB,)), help="comma-separated timed variants ('' = none)")
    p.add_argument("--ab-steps", type=int, default=96, help="steps of each dtrain_ab run")
    p.add_argument("--ab-window", type=int, default=8, help="steps per on/off window of the dtrain_ab runs")
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated fault kinds ('' = none)")
    p.add_argument("--copy-sizes-mib", default="2.5,32,128",
                   help="state sizes of the in-process copy-scaling figure ('' = skip it)")
    p.add_argument("--model", default="small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per launch")
    p.add_argument("--out", default=str(HERE / "results" / "snapshot"), help="output prefix (.json, .png)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (metrics, logs)")
    p.add_argument("--markdown", metavar="JSON", help="only print the tables of an existing results JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.ab_steps, args.ab_window = 6, 1, 1, 16, 4
        args.copy_sizes_mib = "2.5" if args.copy_sizes_mib == "2.5,32,128" else args.copy_sizes_mib
        args.faults = "kill" if args.faults == ",".join(FAULTS) else args.faults
    args.fault_step = args.fault_step or args.steps // 2
    args.fault_kinds = [f for f in args.faults.split(",") if f]
    args.variant_names = [v for v in args.variants.split(",") if v]
    args.copy_sizes = [float(x) for x in args.copy_sizes_mib.split(",") if x]
    unknown = [f for f in args.fault_kinds if f not in FAULTS] + [v for v in args.variant_names if v not in VARIANTS + (AB,)]
    if unknown:
        p.error(f"unknown fault kind(s) or variant(s) {unknown}; choose from {list(FAULTS)} / {list(VARIANTS + (AB,))}")
    if args.ab_window <= AB_SKIP or args.ab_steps < 4 * args.ab_window:
        p.error(f"--ab-window must exceed {AB_SKIP} and --ab-steps be at least 4 windows")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))  # runs the finally blocks
    work = Path(tempfile.mkdtemp(prefix="snapbench-"))
    started = time.time()
    load = {"start": os.getloadavg()}
    runs: list[dict[str, Any]] = []
    faults: list[dict[str, Any]] = []
    scaling: list[dict[str, Any]] = []
    try:
        scaling = copy_scaling(args.copy_sizes, 3 if args.quick else 15, work) if args.copy_sizes else []
        for rep, variant in rotated_schedule(args.variant_names, args.repeats):
            run = run_variant(variant, rep, args, work)
            runs.append(run)
            print(f"[{time.time() - started:6.0f}s] {variant:10s} pass {rep}: ok={run['ok']} "
                  f"block={run['block_s']} tok/s={run['tokens_per_s']} wall={run['wall_s']:.0f}s", flush=True)
        for kind in args.fault_kinds:
            fault = run_fault(kind, args, work)
            faults.append(fault)
            print(f"[{time.time() - started:6.0f}s] fault {kind:9s}: ok={fault['ok']} "
                  f"recovery_s={fault['recovery_s']} from step {fault['resumed_from_step']}", flush=True)
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    load["end"] = os.getloadavg()
    shas = sorted({r["param_sha256"] for r in runs if r["ok"] and r["param_sha256"] and r["variant"] != AB})
    for f in faults:
        f["bit_exact"] = f["param_sha256"] == shas[0] if len(shas) == 1 else None  # None: no reference
    variants = variant_summary(runs, args.repeats)
    ab = ab_summary(runs)
    results = {
        "benchmark": "snapshot",
        "command": " ".join(["python", "benchmarks/snapshot.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {**machine_info(("zfec", "numpy")), "note": MACHINE_NOTE,
                    "disk": "saves go to a temporary directory on the root virtio disk (host-cached)",
                    "load_avg": load},
        "settings": {k: getattr(args, k) for k in ("steps", "warmup", "repeats", "fault_step", "fault_kinds",
                                                   "variant_names", "model", "batch_size", "seed", "ab_steps",
                                                   "ab_window")}
                    | {"world": NODES * NPROC, "nodes": NODES, "nproc": NPROC, "zero_stage": 3},
        "fault_free_param_sha256": shas, "fault_free_consistent": len(shas) == 1,
        "variants": variants, "ab": ab, "memory": memory_summary(runs, args.steps),
        "faults": faults, "copy_scaling": scaling, "wall_s": time.time() - started, "runs": runs,
    }
    results["targets"] = targets(variants, ab, faults)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), results)
    plot(results, out.with_suffix(".png"))
    print(json.dumps({"variants": {v: {"block_ms": _ms(variants[v]["block_s"]["median"]),
                                       "tokens_per_s": variants[v]["tokens_per_s"]["median"],
                                       "overhead": variants[v]["throughput_overhead_paired_median"]}
                                   for v in VARIANTS}, "ab": ab, "ratios": variants["ratios"], "memory": results["memory"],
                      "copy_scaling": scaling, "targets": results["targets"]}, indent=1, default=str))
    ok = all(r["ok"] for r in runs) and all(f["ok"] for f in faults)
    return 0 if ok else 1


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


if __name__ == "__main__":
    raise SystemExit(main())
