"""Offload benchmark: dtrain's offload tier against its in-memory run and DeepSpeed's offload.

Variants (each a fresh single-rank process, interleaved over ``--repeats`` rounds; medians):

* ``tiny``: the in-memory run of a tiny GPT (the RSS floor of this script: interpreter, torch, data);
* ``memory``: dtrain ZeRO-3 in memory (the speed limit);
* ``host``: ``offload.optim = "host"`` (on a CPU device only the per-unit step inside backward);
* ``nvme``: ``offload.optim = "nvme"`` under ``--budget-gb``, O_DIRECT state files in ``--dir``;
* ``nvme-serial``: the same with ``offload.overlap = false``: ZeRO-Infinity's order (reads start
  after backward, chunks pipelined read / step / write among themselves, every write done before
  the step returns; docs/offload.md, "ZeRO-Infinity's order");
* ``nvme-serial-defer``: ``nvme-serial`` whose last writes finish behind the next forward (the
  plugin's ``defer_serial_writes``: what ``offload.overlap = false`` meant before the fourth
  session; reported beside, so the baseline's change is visible);
* ``nvme-cpuadam``: ``nvme`` with ``offload.cpu_adam = true`` (DeepSpeed's CPU Adam kernel);
* ``nvme-aio``: ``nvme`` with ``offload.io = "async_io"`` (DeepSpeed's libaio op moves the state;
  ``nvme`` runs ``offload.io = "auto"``, whose start-up probe picks the faster engine: each
  result's ``io_engine`` says which ran);
* ``nvme-params``: ``offload.optim`` and ``offload.params`` = "nvme" under ``--budget-gb`` (each
  unit's parameter part in a file, read for each gather and step, as ``ds-nvme-param`` does);
* ``nvme-mmap1``: ``nvme`` with ``offload.malloc_mmap_mb = 1`` (glibc maps every block >= 1 MB
  on its own: lower peak RSS, a page fault per page of every large temporary); the other offload
  variants run with ``--malloc-mmap-mb`` (default 0: glibc's own dynamic threshold);
* ``nvme-alternate``: ``nvme`` and ``nvme-serial`` in one process, alternating blocks of
  :data:`ALT_BLOCK` steps (``OffloadPlugin.set_overlap``) and timing the steps after each block's
  first (steady state: each pays the previous step's deferred writes in its forward, as in a run
  of its own). The same heap, files and page state for both, so the machine's drift between
  processes (here +-15 % between runs of one variant) cancels out of ``overlap_speedup``;
* ``ds-cpu``, ``ds-nvme``, ``ds-nvme-param``: DeepSpeed ZeRO-3 with ``offload_optimizer`` cpu /
  nvme, and nvme with ``offload_param`` nvme too, stepping with its DeepSpeedCPUAdam (same model,
  data, AdamW hyperparameters; ``--no-deepspeed`` skips them; a variant that fails to start is
  reported with its error line).

Per variant: step time (median of the measured steps, then median over rounds), peak RSS
(VmHWM over the whole run, and ``peak_rss_steady``: over the measured steps only, VmHWM reset
after the warm-up step), bytes the process read from and wrote to storage (``/proc/self/io``) per step, and
dtrain's own counters (``offload_read_bytes``/``offload_write_bytes``, ``optim_overlap``,
whether O_DIRECT ran). Usage::

    python benchmarks/offload.py --quick          # small model, 1 round (smoke test)
    python benchmarks/offload.py                  # ~10M-parameter GPT ("mid"), 3 rounds, with DeepSpeed
    python benchmarks/offload.py --drop-caches    # the same, the page cache dropped before every step

Each worker also records its RSS at start-up, after building the model, after wrapping it and
after each of the first steps (``rss_trace``), to say where the memory goes.

Results go to ``<out>/offload.json``. The machine's disk is a host-cached virtio disk: O_DIRECT
bypasses this VM's page cache, not the host's, so NVMe figures are optimistic for a real SSD.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LR, WD = 1e-3, 0.01  # AdamW for every variant (DeepSpeed's from its config)
VARIANTS = ("tiny", "memory", "host", "nvme", "nvme-serial", "nvme-serial-defer", "nvme-cpuadam", "nvme-mmap1",
            "nvme-params", "nvme-alternate", "nvme-aio")
DS_VARIANTS = ("ds-cpu", "ds-nvme", "ds-nvme-param")
PRESETS = ("tiny", "small", "bench", "mid", "deep")  # GPTConfig's presets and the two cut in _model
ALT_BLOCK = 3


def _io_bytes() -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def _vmhwm(field: str = "VmHWM") -> int:
    """This process's ``VmHWM`` (or another kB field of /proc/self/status) in bytes; 0 without /proc."""
    from benchmarks._bench_util import read_proc_status_kib

    return (read_proc_status_kib(field) or 0) * 1024


def _reset_hwm() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: ``clear_refs`` value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5\n")
    except OSError:
        pass


def _drop_caches() -> bool:
    """Write dirty pages back and drop this VM's page cache (root only); False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def _model(preset: str):
    import torch

    from dtrain.models import GPT, GPTConfig

    torch.manual_seed(0)
    if preset == "mid":  # ~10M parameters: the bench GPT cut to 4 layers of width 384 (a loaded 2-core machine)
        return GPT(GPTConfig.preset("bench", block_size=64, n_layer=4, n_embd=384, n_head=6))
    if preset == "deep":  # ~24M parameters: 12 such layers, so the embedding is 13 % of the state, not 31 %
        return GPT(GPTConfig.preset("bench", block_size=64, n_layer=12, n_embd=384, n_head=6))
    return GPT(GPTConfig.preset(preset, block_size=64))


def _batch(step: int, batch: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, vocab, (batch, 65), generator=g)
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    variant, steps = spec["variant"], spec["steps"]
    trace = {"start": _vmhwm("VmRSS")}
    model = _model("tiny" if variant == "tiny" else spec["preset"])
    trace["model"] = _vmhwm("VmRSS")
    vocab = model.cfg.vocab_size if hasattr(model, "cfg") else 256
    n_params = sum(p.numel() for p in model.parameters())
    out: dict = {"variant": variant, "params": n_params}
    if variant.startswith("ds-"):
        step_fn, extra = _deepspeed(model, variant, spec)
    else:
        step_fn, extra = _dtrain(model, variant, spec)
    trace["wrapped"] = _vmhwm("VmRSS")
    trace["wrapped_hwm"] = _vmhwm()
    times, io0, dropped = [], None, []
    for step in range(steps + 1):  # step 0 warms up (and, for the tiers, lays the state out)
        batch = _batch(step, spec["batch"], vocab)
        if spec.get("drop_caches"):
            dropped.append(_drop_caches())
        if step == 1:
            io0 = _io_bytes()
            trace["step0_hwm"] = _vmhwm()
            _reset_hwm()  # peak_rss_steady: the peak of the measured steps, start-up and step 0 left out
        t = time.perf_counter()
        step_fn(batch)
        if step:
            times.append(time.perf_counter() - t)
        if step < 3:
            trace[f"step{step}"] = _vmhwm("VmRSS")
    io1 = _io_bytes()
    out.update(rss_trace=trace, caches_dropped=all(dropped) if dropped else False)
    out.update(step_s=statistics.median(times), peak_rss=max(_vmhwm(), trace.get("step0_hwm", 0)),
               peak_rss_steady=_vmhwm(),
               disk_read_per_step=(io1[0] - io0[0]) / steps, disk_write_per_step=(io1[1] - io0[1]) / steps,
               **extra())
    return out


def _dtrain(model, variant: str, spec: dict):
    import dtrain

    cfg: dict = {"zero": {"stage": 3}, "train": {"clip_grad_norm": spec["clip"]}}
    serial = variant.startswith("nvme-serial")
    if variant in ("host", "nvme", "nvme-serial", "nvme-serial-defer", "nvme-cpuadam", "nvme-mmap1", "nvme-params",
                   "nvme-alternate", "nvme-aio"):
        cfg["offload"] = {"enabled": True, "optim": "host" if variant == "host" else "nvme",
                          "params": "nvme" if variant == "nvme-params" else "device",
                          "dir": spec["dir"], "overlap": not serial,
                          "cpu_adam": variant == "nvme-cpuadam", "io": "async_io" if variant == "nvme-aio" else "auto",
                          "malloc_mmap_mb": 1.0 if variant == "nvme-mmap1" else spec.get("malloc_mmap_mb", 0.0),
                          "memory_budget_gb": spec["budget_gb"] if variant != "host" else None}
    engine = dtrain.wrap(model, optimizer=lambda ps: __import__("torch").optim.AdamW(ps, lr=LR, weight_decay=WD),
                         config=cfg)
    plugin = next((p for p in engine.plugins if p.name == "offload"), None)
    if variant == "nvme-serial-defer":
        plugin.defer_serial_writes = True
        plugin.set_overlap(False)
    sums: dict = {}
    modes: dict[bool, list[float]] = {True: [], False: []}
    count = [0]

    def step(batch):
        overlap = count[0] // ALT_BLOCK % 2 == 0
        if variant == "nvme-alternate":
            plugin.set_overlap(overlap)
        t = time.perf_counter()
        engine.train_step(batch)
        if variant == "nvme-alternate" and count[0] >= ALT_BLOCK and count[0] % ALT_BLOCK:  # not a block's first step
            modes[overlap].append(time.perf_counter() - t)
        count[0] += 1
        if plugin is not None:
            for k, v in plugin.metrics().items():
                sums.setdefault(k, []).append(v)

    def extra():
        tiers = engine.layout.state_bytes_by_tier()
        agg = {k: statistics.median(v[1:] or v) for k, v in sums.items()}
        if modes[True] and modes[False]:
            on, off = statistics.median(modes[True]), statistics.median(modes[False])
            agg.update(step_s_overlap=on, step_s_serial=off, overlap_speedup=off / on)
        if plugin is not None and plugin.run_dir is not None:
            agg["io_engine"] = plugin.io.describe()
        return {"state_bytes_by_tier": tiers, **agg}

    return step, extra


def _deepspeed(model, variant: str, spec: dict):
    import deepspeed
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="gloo")
    device = "cpu" if variant == "ds-cpu" else "nvme"
    offload = {"device": device, "pin_memory": False}
    zero: dict = {"stage": 3, "offload_optimizer": offload}
    if device == "nvme":
        offload["nvme_path"] = spec["dir"]
        zero["stage3_prefetch_bucket_size"] = 0  # ZeRO-3 NVMe offload asserts without it here
    if variant == "ds-nvme-param":
        # buffer_size: elements per parameter swap buffer (default 1e8: 5 x 400 MB); the largest
        # parameter (the embedding) must fit
        largest = max(p.numel() for p in model.parameters())
        zero["offload_param"] = {"device": "nvme", "nvme_path": spec["dir"], "pin_memory": False,
                                 "buffer_size": int(largest * 1.25)}
    config = {"train_micro_batch_size_per_gpu": spec["batch"], "gradient_accumulation_steps": 1,
              "zero_optimization": zero,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
              "gradient_clipping": spec["clip"] or 0.0, "steps_per_print": 10**9}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    inner = getattr(optimizer, "optimizer", optimizer)

    def step(batch):
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()

    return step, lambda: {"optimizer": type(inner).__name__}


def _disk_probe(directory: str, nbytes: int = 256 << 20, threads: int = 2) -> dict:
    """O_DIRECT write then read of one ``nbytes`` file with the tier's own I/O path (the page cache
    dropped in between when allowed): what the disk under ``--dir`` moves per second."""
    from dtrain.offload.aio import DirectFile, IOPool, aligned_buffer

    path = os.path.join(directory, "disk-probe")
    f, pool, buf = DirectFile(path, nbytes), IOPool(threads), aligned_buffer(nbytes)
    buf.fill_(7)
    try:
        t = time.perf_counter()
        pool.write(f, buf)
        os.fsync(f.fd)
        write_s = time.perf_counter() - t
        dropped = _drop_caches()
        t = time.perf_counter()
        pool.read(f, buf)
        read_s = time.perf_counter() - t
    finally:
        pool.shutdown()
        f.close()
        os.unlink(path)
    return {"bytes": nbytes, "direct_io": f.direct, "write_GBps": nbytes / write_s / 1e9,
            "read_GBps": nbytes / read_s / 1e9, "caches_dropped": dropped}


def _run(spec: dict, port: int) -> dict:
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=spec["timeout"])
    except subprocess.TimeoutExpired:
        return {"variant": spec["variant"], "error": f"timed out after {spec['timeout']} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        lines_err = proc.stderr.strip().splitlines() or ["(no output)"]
        tail = next((x for x in reversed(lines_err) if "Error" in x), lines_err[-1])
        return {"variant": spec["variant"], "error": tail[:300]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed variants")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before every step (root; /proc/sys/vm/drop_caches)")
    ap.add_argument("--variants", default=None, help=f"comma list out of {','.join(VARIANTS + DS_VARIANTS)}")
    ap.add_argument("--preset", default=None, help=f"model: one of {','.join(PRESETS)} (default mid)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--budget-gb", type=float, default=None)
    ap.add_argument("--clip", type=float, default=None)
    ap.add_argument("--malloc-mmap-mb", type=float, default=0.0,
                    help="offload.malloc_mmap_mb of the offload variants (0: glibc's dynamic threshold)")
    ap.add_argument("--dir", default=None, help="offload directory (default: a temporary one under /tmp)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run (a hung run is reported, not waited for)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    from benchmarks._bench_util import find_free_port, machine_info

    preset = args.preset or ("small" if args.quick else "mid")
    steps = args.steps or (3 if args.quick else 5)
    repeats = args.repeats or (1 if args.quick else 3)
    variants = VARIANTS + (() if args.no_deepspeed else DS_VARIANTS)
    if args.variants:
        variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS + DS_VARIANTS]
    if unknown or preset not in PRESETS or not variants:
        what = (f"unknown variants {unknown}; choose from {','.join(VARIANTS + DS_VARIANTS)}" if unknown else
                "--variants names none" if not variants else
                f"unknown preset {preset!r}; choose one of {','.join(PRESETS)}")
        print(f"benchmarks/offload.py: {what}", file=sys.stderr)
        sys.exit(2)
    model = _model(preset)
    n = sum(p.numel() for p in model.parameters())
    del model
    # Resident under the tier: params + grads (4 + 4 bytes/param); the budget adds room for the staging
    # pool, a third of the moments (8 bytes/param) unless given.
    budget = args.budget_gb or (8 * n + 8 * n / 3) / 2**30
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(dir=args.dir or "/tmp", prefix="dtrain-offload-bench-") as tmp:
        disk = _disk_probe(tmp)
        print(json.dumps({"disk": disk}), flush=True)
        for r in range(repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: load drifts
            for v in order:
                spec = {"variant": v, "preset": preset, "steps": steps, "batch": args.batch, "dir": tmp,
                        "budget_gb": budget, "clip": args.clip, "timeout": args.timeout,
                        "drop_caches": args.drop_caches, "malloc_mmap_mb": args.malloc_mmap_mb}
                res = _run(spec, find_free_port())
                runs[v].append(res)
                print(json.dumps({k: res.get(k) for k in ("variant", "step_s", "peak_rss", "error",
                                                          "optim_overlap", "offload_direct_io", "io_engine")}),
                      flush=True)
    report = {"preset": preset, "params": n, "budget_gb": budget, "moments_gb": 8 * n / 2**30,
              "drop_caches": args.drop_caches, "lr": LR, "weight_decay": WD, "disk": disk,
              "steps": steps, "repeats": repeats, "batch": args.batch, "machine": machine_info(("deepspeed",)),
              "malloc_mmap_mb": args.malloc_mmap_mb, "load_average": os.getloadavg(), "runs": runs, "median": {}}
    for v, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            report["median"][v] = {"error": rs[-1].get("error")}
            continue
        report["median"][v] = {k: statistics.median(x[k] for x in ok) for k in ok[0]
                               if isinstance(ok[0][k], (int, float)) and k != "params"}
    report["targets"] = _targets(report["median"], budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"offload{args.tag}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["median"], indent=1))
    print(json.dumps(report["targets"], indent=1))


def _targets(median: dict, budget_gb: float) -> dict:
    """Issue 14's targets from the medians: speed ratios (higher is better) and the RSS limit."""
    def step(v: str) -> float | None:
        return median.get(v, {}).get("step_s")

    out: dict = {}
    for nvme in ("nvme", "nvme-cpuadam", "nvme-mmap1", "nvme-aio"):
        if step(nvme):
            if step("memory"):
                out[f"{nvme} speed / memory (>= 0.7)"] = step("memory") / step(nvme)
            if step("ds-nvme"):
                out[f"{nvme} speed / ds-nvme (>= 2)"] = step("ds-nvme") / step(nvme)
    if step("nvme") and step("nvme-serial"):
        out["nvme speed / nvme-serial (>= 1.3)"] = step("nvme-serial") / step("nvme")
    alt = median.get("nvme-alternate", {})
    if alt.get("overlap_speedup"):
        out["nvme-alternate: overlapped / ZeRO-Infinity order, same process (>= 1.3)"] = alt["overlap_speedup"]
    if step("nvme") and step("nvme-aio"):
        out["nvme speed / nvme-aio (offload.io auto against async_io)"] = step("nvme-aio") / step("nvme")
    if step("nvme") and step("nvme-serial-defer"):
        out["nvme speed / nvme-serial-defer (old baseline)"] = step("nvme-serial-defer") / step("nvme")
    tiny = median.get("tiny", {}).get("peak_rss")
    if tiny:
        out["rss_limit_MiB"] = (tiny + 1.1 * budget_gb * 2**30) / 2**20
        for v in ("nvme", "nvme-serial", "nvme-serial-defer", "nvme-cpuadam", "nvme-mmap1", "nvme-aio"):
            if median.get(v, {}).get("peak_rss"):
                out[f"{v} peak_rss_MiB"] = median[v]["peak_rss"] / 2**20
    return out


if __name__ == "__main__":
    main()
