"""Per-kind zero levels on namespaced hosts (default 2 x 2 ranks), side by side with DeepSpeed and FSDP2.

    python benchmarks/hierarchical.py                      # 1 Gbit and 100 Mbit, 3 repeats
    python benchmarks/hierarchical.py --rates 100mbit --json benchmarks/results/hierarchical_100mbit.json
    python benchmarks/hierarchical.py --quick              # 1 Gbit, 1 repeat, 5 steps

Every variant trains the same GPT (``--preset``, byte vocabulary 256) on the shipped corpus
(examples/train_gpt.py's ``batch_for``: same global batch, seed and split over ranks) with
``torch.optim.AdamW(lr=3e-3)``, fp32, no clipping, on 2 simulated hosts (network namespaces,
``tc tbf`` on the inter-host link; dtrain/netns.py) of 2 ranks each, so ``node`` groups stay inside
a host and ``global`` ones cross the link. Variants (docs/hierarchical.md):

* dtrain: ``zero3`` (flat ZeRO-3: every kind at ``global``), ``hsdp`` (every kind at ``node``),
  ``hpz`` (ZeRO-3 plus a node-level backward copy), ``hpz-int8`` (the same with int8 all-gathers),
  ``frontier3`` (params and grads at ``node``, optimizer state at ``global``; no level below the
  node here), ``auto`` (``zero.preset = "auto"``, the planner's choice at start-up, told the step's tokens
  through ``zero.auto_tokens_per_step``; ``DTRAIN_CLUSTER`` names the cluster file);
* peers, same model/data/optimizer (their runners are benchmarks/zero.py's): ``deepspeed-zero3``,
  ``deepspeed-hpz`` (ZeRO++ ``zero_hpz_partition_size = 2``, i.e. one host), ``deepspeed-hpz-int8``
  (plus ``zero_quantized_weights``), ``deepspeed-hpz-live`` (hpZ with ``stage3_max_live_parameters`` and
  ``stage3_max_reuse_distance`` at 1000, so DeepSpeed releases each module's parameters after the
  forward and its backward really re-gathers from the secondary copy; with the defaults it keeps
  this model gathered from forward to backward), ``fsdp2-hsdp`` (``fully_shard`` on a 2-D DeviceMesh,
  replicate = hosts, shard = ranks per host). A variant that cannot run here is kept in the
  results with the error line it gave.

Meters, the same for every variant: step time (per step the max over ranks, median of the timed
steps, median over repeats); **inter-node bytes per step at the link**: the ``tx_bytes`` of each
host namespace's ``eth0`` (/proc/net/dev, so frames with their TCP/IP headers), read by each
host's local rank 0 after a barrier before and after the timed window, summed over hosts;
peak RSS (VmHWM, max over ranks); state bytes per kind measured from storage
(``dtrain.metrics.storage_bytes``, one helper for every framework); the final loss (mean over
ranks). dtrain variants also record their own ``comm_bytes`` per level (rank 0's, and ``global``
summed over ranks) as a cross-check of the link meter, their levels and gather dtype.

Model size (``--preset``, default ``mid``): the example's ``small`` GPT (842k parameters) is
compute-bound here (flat ZeRO-3 moves ~7 MB per step over a 1 Gbit link: ~60 ms against ~0.5 s
of compute), so the placement of state barely shows in the step time. ``mid`` (``small`` widened
to n_embd 384, 7.25M parameters) puts ~72 MB per step each way on the link under flat ZeRO-3
(~0.6 s at 1 Gbit, ~6 s at 100 Mbit) against ~0.7 s of compute and CPU for 4 ranks on 2 cores, so
the link matters at both rates while each rate stays a separate invocation of under ~20 minutes
on 2 cores (3 rounds: ~14 min at 1 Gbit, ~20 min at 100 Mbit with --steps 5). ``bench`` (24M,
vocab 256) is heavier still.

Tokens per step (``--batch``, sequences of the preset's block size, split over the 4 ranks) set how
much compute each parameter byte on the link is set against. The default (8 x 128) is the regime
of the earlier figures; ``--batch 4`` (one 128-token sequence per rank, as when fine-tuning with
small per-device batches over a slow link) makes communication a larger share of the step. Every
table says which it is (preset, parameters, tokens per step and per rank) and the **link share**
of each variant: the busier host's transmitted bytes per step at the link rate, over the step time
(the time the step would spend on the link if nothing else ran).

``--block`` sets the tokens per sequence (default: the preset's 128): ``--batch 4 --block 64`` (64 tokens
per rank) is the link-bound regime a GPU cluster on a 1 Gbit link is in (a GPU computes ~10^3-10^4x
faster than one of these cores, so its compute per parameter byte sent is far smaller than here).
``--nodes``/``--nproc`` change the topology (default 2 hosts x 2 ranks; 2 x 4 and 4 x 2 fit in
memory, but 8 ranks on 2 cores make their step times a measure of CPU sharing, so use them for
the bytes). Each rank record also keeps ``comm_wait_s_per_step``: the seconds the rank's training
thread spent blocked in collectives per step, per ``op@group`` (``Comm.wait_s``).

Variants are interleaved in a rotated order, repeated, and medians reported. Writes
benchmarks/results/hierarchical.json (``--json`` to change it; ``--quick``: hierarchical_quick.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
NODES, NPROC = 2, 2

# name -> GPT preset and overrides (vocabulary: the corpus' bytes)
PRESETS: dict[str, tuple[str, dict[str, int]]] = {
    "small": ("small", {"vocab_size": 256}),
    "mid": ("small", {"vocab_size": 256, "n_embd": 384, "n_head": 6}),
    "bench": ("bench", {"vocab_size": 256}),
}

# name -> framework and its settings; dtrain: the ``zero`` config section (rebuilt by set_topology)
VARIANTS: dict[str, dict[str, Any]] = {}


def set_topology(nodes: int, nproc: int) -> None:
    """Hosts and ranks per host of this invocation (``--nodes``/``--nproc``); the peers' settings
    that name a host's size follow it."""
    global NODES, NPROC
    NODES, NPROC = nodes, nproc
    VARIANTS.clear()
    VARIANTS.update({
        "zero3": {"dtrain": {"stage": 3}},
        "hsdp": {"dtrain": {"preset": "hsdp"}},
        "hpz": {"dtrain": {"preset": "hpz"}},
        "hpz-int8": {"dtrain": {"preset": "hpz", "gather_dtype": "int8"}},
        "frontier3": {"dtrain": {"preset": "frontier3"}},
        "auto": {"dtrain": {"preset": "auto"}},
        "deepspeed-zero3": {"deepspeed": {}},
        "deepspeed-hpz": {"deepspeed": {"zero_hpz_partition_size": nproc}},
        "deepspeed-hpz-int8": {"deepspeed": {"zero_hpz_partition_size": nproc, "zero_quantized_weights": True}},
        # hpZ with parameters released after the forward, so its backward re-gathers from the secondary copy
        "deepspeed-hpz-live": {"deepspeed": {"zero_hpz_partition_size": nproc, "stage3_max_live_parameters": 1000,
                                             "stage3_max_reuse_distance": 1000}},
        "fsdp2-hsdp": {"fsdp2": {"mesh": (nodes, nproc)}},
    })


set_topology(NODES, NPROC)


def variant_spec(name: str) -> dict[str, Any]:
    """A named variant, or ``levels:P/G/O/B`` (any assignment, e.g. the planner's pick)."""
    if name.startswith("levels:"):
        p, g, o, b = name.split(":", 1)[1].split("/")
        return {"dtrain": {"params": p, "grads": g, "optim": o, "backward_params": b}}
    return VARIANTS[name]
# where the peers keep each kind, in dtrain's level names (for the tables)
PEER_LEVELS = {
    "deepspeed-zero3": ("global", "global", "global", "global", "fp32"),
    "deepspeed-hpz": ("global", "global", "global", "node", "fp32"),
    "deepspeed-hpz-int8": ("global", "global", "global", "node", "int8"),
    "deepspeed-hpz-live": ("global", "global", "global", "node", "fp32"),
    "fsdp2-hsdp": ("node", "node", "node", "node", "fp32"),
}
LR = 3e-3


def model_config(preset: str) -> Any:
    from dtrain.models import GPTConfig

    base, overrides = PRESETS[preset]
    return GPTConfig.preset(base, **overrides)


def parse_rate_bits(rate: str) -> int:
    from dtrain.netns import parse_rate_bits as parse

    return parse(rate)


def link_bytes(ifname: str = "eth0") -> dict[str, int]:
    """This network namespace's rx/tx byte counters of ``ifname`` (/proc/net/dev is per namespace)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == ifname:
            fields = rest.split()
            return {"rx": int(fields[0]), "tx": int(fields[8])}
    raise RuntimeError(f"no interface {ifname} in /proc/net/dev")


def _build(name: str, model: Any, batch_per_rank: int, tokens_per_step: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """(step(batch, measure, clock) -> loss, state_bytes() -> storage figures, facts) for one variant."""
    import torch

    import zero as zero_bench  # benchmarks/zero.py: the peers' runners and the step clock

    spec = variant_spec(name)
    if "dtrain" in spec:
        import dtrain
        from dtrain.metrics import layout_storage_bytes

        zero = dict(spec["dtrain"])
        if zero.get("preset") == "auto":  # the planner weighs compute against communication with the step's tokens
            zero["auto_tokens_per_step"] = tokens_per_step
        engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=LR), config={"zero": zero})
        facts = {"framework": "dtrain", "engine": engine, "levels": engine.layout.levels.as_dict(),
                 "gather_dtype": getattr(engine.layout, "gather_dtype", "fp32")}
        return ((lambda batch, measure, clock: float(engine.train_step(batch))),
                (lambda: layout_storage_bytes(engine.model, engine.layout)), facts)
    if "deepspeed" in spec:
        runner = zero_bench.DeepSpeedRunner(model, 3, "fp32", LR, batch_per_rank, zero_extra=spec["deepspeed"])
        framework = "deepspeed"
    else:
        from torch.distributed.device_mesh import init_device_mesh

        zero_bench._init_pg_gloo()
        mesh = init_device_mesh("cpu", spec["fsdp2"]["mesh"], mesh_dim_names=("replicate", "shard"))
        runner = zero_bench.Fsdp2Runner(model, "fp32", LR, mesh=mesh)
        framework = "fsdp2"
    p, g, o, b, dtype = PEER_LEVELS[name]
    facts = {"framework": framework, "levels": {"params": p, "grads": g, "optim": o, "backward_params": b},
             "gather_dtype": dtype}
    return ((lambda batch, measure, clock: runner.step(batch["input_ids"], batch["labels"], measure, clock)),
            runner.state_bytes, facts)


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(HERE))
    from _bench_util import peak_rss_bytes, write_json
    from dtrain.models import GPT
    from train_gpt import CORPUS, batch_for
    from zero import Stopwatch

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    data = torch.frombuffer(bytearray(Path(CORPUS).read_bytes()), dtype=torch.uint8)
    torch.manual_seed(0)
    model = GPT(model_config(args.preset))
    n_params = sum(p.numel() for p in model.parameters())
    step, state_bytes, facts = _build(args.variant, model, args.batch // world,
                                        args.batch * (args.block or model.cfg.block_size))
    engine = facts.pop("engine", None)
    times, losses, link, comm_before, wait_before = [], [], {}, {}, {}
    for i in range(args.steps):
        if i == args.warmup:
            dist.barrier()
            link["before"] = link_bytes() if local_rank == 0 else None
            comm_before = dict(engine.comm.bytes_sent) if engine else {}
            wait_before = dict(engine.comm.wait_s) if engine else {}
        batch = batch_for(data, i, 0, args.batch, args.block or model.cfg.block_size, rank, world)
        clock = Stopwatch()
        losses.append(step(batch, i == args.steps - 1, clock))
        times.append(clock.stop())
    dist.barrier()
    link["after"] = link_bytes() if local_rank == 0 else None
    measured = args.steps - args.warmup
    comm = ({k: (v - comm_before.get(k, 0)) / measured for k, v in engine.comm.bytes_sent.items()}
            if engine else {})
    waits = ({k: (v - wait_before.get(k, 0.0)) / measured for k, v in engine.comm.wait_s.items()}
             if engine else {})
    write_json(Path(args.out) / f"r{rank}.json", {
        "rank": rank, "node": rank // int(os.environ["LOCAL_WORLD_SIZE"]), "step_times_s": times,
        "losses": losses, "link": link if local_rank == 0 else None, "comm_bytes_per_step": comm,
        "comm_wait_s_per_step": waits,
        "peak_rss_bytes": peak_rss_bytes(), "state_bytes_storage": state_bytes(),
        "state_bytes": engine.state_bytes() if engine else None, "n_params": n_params, **facts})
    dist.barrier()


def _error_line(log: Path) -> str:
    """The last line of a failed run's stderr that says something (the exception, usually)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "Exception" in ln]
    return (errors or lines or ["(no output)"])[-1][:400]


def run_once(hosts: Any, name: str, rate: str, rep: int, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """One variant in fresh rank processes; the ranks' records merged into one run record."""
    from dtrain import netns

    out = Path(args.tmp) / f"{rate}-{name.replace(':', '_').replace('/', '-')}-{rep}"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("r*.json"):
        old.unlink()
    log = out / "stderr.log"
    cmd = [str(Path(__file__).resolve()), "--worker", "--variant", name, "--out", str(out), "--preset", args.preset,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--block", str(args.block), "--nodes", str(NODES), "--nproc", str(NPROC)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as err:
        codes = netns.wait_all(netns.spawn_ranks(hosts, NPROC, cmd, port=port, env={"DS_ACCELERATOR": "cpu"},
                                                 stdout=err, stderr=err), timeout_s=args.timeout_s)
    run: dict[str, Any] = {"loadavg_1m": round(load, 2), "wall_s": round(time.perf_counter() - start, 1), "rate": rate}
    if codes != [0] * (NODES * NPROC):
        run.update(ok=False, error=f"exit codes {codes}: {_error_line(log)}")
        return run
    return merge_ranks(out, args, run)


def merge_ranks(out: Path, args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """One run's record from its ranks' files in ``out`` (also used by --from-runs)."""
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("r*.json"))]
    if len(ranks) != NODES * NPROC:
        run.update(ok=False, error=f"{len(ranks)} of {NODES * NPROC} rank records: {_error_line(out / 'stderr.log')}")
        return run
    ranks.sort(key=lambda r: r["rank"])
    w, measured = args.warmup, args.steps - args.warmup
    per_step = [max(r["step_times_s"][i] for r in ranks) for i in range(args.steps)]
    hosts_link = [r["link"] for r in ranks if r["link"]]
    tx = sum(h["after"]["tx"] - h["before"]["tx"] for h in hosts_link) / measured
    rx = sum(h["after"]["rx"] - h["before"]["rx"] for h in hosts_link) / measured
    zero = ranks[0]
    busiest = max(h["after"]["tx"] - h["before"]["tx"] for h in hosts_link) / measured  # one direction
    link_s = busiest * 8 / parse_rate_bits(run["rate"]) if run.get("rate") else None
    step_s = statistics.median(per_step[w:])
    run.update(ok=True, step_s=step_s, step_times_s=per_step,
               link_s_per_step=link_s, link_share=None if link_s is None else link_s / step_s,
               losses=[statistics.fmean(r["losses"][i] for r in ranks) for i in range(args.steps)],
               link_bytes_per_step=tx, link_rx_bytes_per_step=rx,
               bytes_per_step=zero["comm_bytes_per_step"],
               comm_global_bytes_per_step_all_ranks=sum(r["comm_bytes_per_step"].get("global", 0) for r in ranks),
               peak_rss_bytes=max(r["peak_rss_bytes"] or 0 for r in ranks),
               state_bytes=zero["state_bytes"] or zero["state_bytes_storage"],
               state_bytes_storage={k: max(r["state_bytes_storage"].get(k, 0) for r in ranks)
                                    for k in ("params", "grads", "optim")},
               **{k: zero[k] for k in ("framework", "levels", "gather_dtype", "n_params")})
    return run


def _median_known(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: medians over the repeats that ran, or the error when none did."""
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        ok = [r for r in rs if r["ok"]]
        if not ok:
            summary[name] = {"status": "failed", "error": rs[0]["error"], "framework": next(iter(variant_spec(name))),
                             "loadavg_1m": [r["loadavg_1m"] for r in rs]}
            continue
        first = ok[0]
        summary[name] = {
            "status": "ok", "runs_ok": len(ok), "runs_total": len(rs),
            "step_s_median": statistics.median(r["step_s"] for r in ok), "step_s_all": [r["step_s"] for r in ok],
            "link_bytes_per_step": statistics.median(r["link_bytes_per_step"] for r in ok),
            "link_bytes_all": [r["link_bytes_per_step"] for r in ok],
            "link_rx_bytes_per_step": statistics.median(r["link_rx_bytes_per_step"] for r in ok),
            "link_s_per_step": _median_known(r.get("link_s_per_step") for r in ok),
            "link_share": _median_known(r.get("link_share") for r in ok),
            "bytes_per_step": first["bytes_per_step"],
            "comm_global_bytes_per_step_all_ranks": first["comm_global_bytes_per_step_all_ranks"],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok),
            "state_bytes": first["state_bytes"], "state_bytes_storage": first["state_bytes_storage"],
            "final_loss": statistics.median(r["losses"][-1] for r in ok), "losses": first["losses"],
            "loadavg_1m": [r["loadavg_1m"] for r in rs],
            **{k: first[k] for k in ("framework", "levels", "gather_dtype", "n_params")},
        }
        if len(ok) < len(rs):
            summary[name]["errors"] = sorted({r["error"] for r in rs if not r["ok"]})
    base = summary.get("zero3")
    if base and base["status"] == "ok":
        for s in summary.values():
            if s["status"] != "ok":
                continue
            s["speedup_vs_zero3"] = base["step_s_median"] / s["step_s_median"]
            s["link_bytes_vs_zero3"] = s["link_bytes_per_step"] / max(base["link_bytes_per_step"], 1)
            if s["framework"] == "dtrain":
                s["global_bytes_vs_zero3"] = (s["bytes_per_step"].get("global", 0) /
                                              max(base["bytes_per_step"].get("global", 1), 1))
    return summary


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets on one rate's summary (link bytes are the meter; None when a side is missing)."""
    def ok(name: str) -> dict[str, Any] | None:
        s = summary.get(name)
        return s if s and s["status"] == "ok" else None

    out: dict[str, Any] = {}
    z3, hpz, ds_hpz = ok("zero3"), ok("hpz"), ok("deepspeed-hpz")
    dtrain_ok = {n: s for n, s in summary.items() if s["status"] == "ok" and s["framework"] == "dtrain"}
    unquantized = {n: s for n, s in dtrain_ok.items() if s["gather_dtype"] != "int8" and n != "zero3"}
    fastest = min((n for n in dtrain_ok if n != "zero3"), key=lambda n: dtrain_ok[n]["step_s_median"], default=None)

    def row(value: float | None, op: str, limit: float, what: str) -> dict[str, Any]:
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        return {"value": value, "op": op, "limit": limit, "met": met, "what": what}

    if z3 and hpz:
        out["hpz_link_bytes_vs_zero3"] = row(hpz["link_bytes_vs_zero3"], "<=", 0.67, "hpz")
    if z3 and unquantized:
        best = min(unquantized, key=lambda n: unquantized[n]["link_bytes_per_step"])
        out["best_unquantized_link_bytes_vs_zero3"] = row(unquantized[best]["link_bytes_vs_zero3"], "<=", 0.4, best)
    if z3 and fastest:
        out["best_speedup_vs_zero3"] = row(dtrain_ok[fastest]["speedup_vs_zero3"], ">=", 1.5, fastest)
    if ds_hpz and fastest:
        out["best_step_vs_deepspeed_hpz"] = row(dtrain_ok[fastest]["step_s_median"] / ds_hpz["step_s_median"],
                                                "<=", 0.8, fastest)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _regime(doc: dict[str, Any]) -> str:
    """The workload in words: model preset, parameters, tokens per step and per rank."""
    n = next((s.get("n_params") for r in doc["rates"].values() for s in r.values() if s.get("n_params")), None)
    topo = doc.get("topology", {"nodes": NODES, "nproc_per_node": NPROC})
    per_rank = doc["tokens_per_step"] // (topo["nodes"] * topo["nproc_per_node"])
    size = f", {n / 1e6:.2f}M parameters" if n else ""
    return (f"{topo['nodes']} hosts x {topo['nproc_per_node']} ranks, preset {doc['model']['preset']}{size}, "
            f"{doc['tokens_per_step']} tokens/step, {per_rank} per rank")


def markdown(doc: dict[str, Any]) -> str:
    """The BENCHMARKS.md tables of one results file: per rate, every variant, then the targets."""
    mb = 1e6
    lines = []
    for rate, summary in doc["rates"].items():
        lines += [f"**{rate}** ({_regime(doc)})", "",
                  "| variant | levels p/g/o/b, gather | ms/step median (all) | vs zero3 | link MB/step | vs zero3 | "
                  "link share | dtrain global MB/rank | peak RSS MiB | state MiB p/g/o (storage) | final loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in summary.items():
            if s["status"] != "ok":
                lines.append(f"| {name} | | failed: {s['error'].replace('|', '/')[:160]} | | | | | | | | |")
                continue
            lv = s["levels"]
            levels = "/".join(lv[k] for k in ("params", "grads", "optim", "backward_params")) + f", {s['gather_dtype']}"
            st = s["state_bytes_storage"]
            glob = f"{s['bytes_per_step'].get('global', 0) / mb:.2f}" if s["framework"] == "dtrain" else "-"
            lines.append(
                f"| {name} | {levels} | {s['step_s_median'] * 1e3:.0f} ({', '.join(f'{t * 1e3:.0f}' for t in s['step_s_all'])}) "
                f"| {s.get('speedup_vs_zero3', 0):.2f}x | {s['link_bytes_per_step'] / mb:.1f} | "
                f"{s.get('link_bytes_vs_zero3', 0):.2f} | {_pct(s.get('link_share'))} | {glob} | "
                f"{s['peak_rss_bytes'] / 2**20:.0f} | "
                f"{st['params'] / 2**20:.1f}/{st['grads'] / 2**20:.1f}/{st['optim'] / 2**20:.1f} | {s['final_loss']:.4f} |")
        lines += ["", "| target | variant | value | limit | met |", "|---|---|---|---|---|"]
        for key, t in doc["targets"].get(rate, {}).items():
            lines.append(f"| {key} | {t['what']} | {t['value']:.3f} | {t['op']} {t['limit']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def rebuild(args: argparse.Namespace) -> int:
    """The results file of runs already made (each run's rank files under --tmp), medians over what finished."""
    sys.path.insert(0, str(HERE))
    from _bench_util import machine_info, write_json

    doc: dict[str, Any] = {"machine": machine_info(extra_modules=("deepspeed",)), "rates": {}, "targets": {}}
    doc.update(args={k: v for k, v in vars(args).items() if k not in ("worker", "variant", "out")},
               rebuilt_from_runs=True, model={"preset": args.preset, "config": {
                   k: getattr(model_config(args.preset), k) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}},
               batch=args.batch, tokens_per_step=args.batch * (args.block or model_config(args.preset).block_size),
               optimizer=f"torch.optim.AdamW(lr={LR})", precision="fp32", topology={"nodes": NODES, "nproc_per_node": NPROC})
    for rate in args.rates.split(","):
        runs: dict[str, list[dict[str, Any]]] = {}
        for name in args.variants.split(","):
            for out in sorted(Path(args.tmp).glob(f"{rate}-{name}-[0-9]*")):
                if out.is_dir() and (out / "stderr.log").exists():
                    runs.setdefault(name, []).append(merge_ranks(out, args, {"loadavg_1m": None, "run_dir": out.name,
                                                                               "rate": rate}))
        doc["rates"][rate] = summarize(runs)
        doc["targets"][rate] = targets(doc["rates"][rate])
    write_json(args.json, doc)
    print(markdown(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rates", default="1gbit,100mbit")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--preset", default="mid", choices=sorted(PRESETS), help="GPT size (see the module docstring)")
    p.add_argument("--steps", type=int, default=8, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences of --block tokens)")
    p.add_argument("--block", type=int, default=0, help="tokens per sequence (default: the preset's block size, 128)")
    p.add_argument("--nodes", type=int, default=2, help="simulated hosts (network namespaces)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per host")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 Gbit, 1 repeat, 5 steps")
    p.add_argument("--timeout-s", type=float, default=600, help="per run")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/hierarchical.json)")
    p.add_argument("--tmp", default="/tmp/dtrain-bench-hier")
    p.add_argument("--from-runs", action="store_true", help="rebuild --json from the rank files under --tmp "
                   "(an invocation cut short); --rates/--variants/--steps/--warmup/--preset/--batch as it ran")
    p.add_argument("--markdown", nargs="+", metavar="JSON", help="print the tables of results files and exit")
    args = p.parse_args(argv)
    set_topology(args.nodes, args.nproc)
    if args.from_runs:  # rebuild the results of an invocation cut short from its runs' rank files
        return rebuild(args)
    if args.markdown:
        print("\n".join(markdown(json.loads(Path(f).read_text())) for f in args.markdown))
        return 0
    if args.worker:
        worker(args)
        return 0
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS and not (n.startswith("levels:") and n.count("/") == 3)]
    if unknown:
        print(f"unknown variants {unknown}; choose from {','.join(VARIANTS)} or levels:PARAMS/GRADS/OPTIM/BACKWARD", file=sys.stderr)
        return 2
    if args.quick:
        args.rates, args.repeats, args.steps, args.warmup = args.rates.split(",")[0], 1, 5, 2
    if not 0 < args.warmup < args.steps or args.batch % (NODES * NPROC):
        print(f"need 0 < --warmup < --steps and --batch a multiple of {NODES * NPROC}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    from _bench_util import machine_info, rotated_schedule, write_json
    from dtrain import netns

    reason = netns.unavailable_reason()
    if reason:
        print(f"benchmarks/hierarchical.py needs the slow-link harness: {reason}", file=sys.stderr)
        return 2
    os.makedirs(args.tmp, exist_ok=True)
    cfg = model_config(args.preset)
    results: dict[str, Any] = {
        "machine": machine_info(extra_modules=("deepspeed",)),
        "command": "python benchmarks/hierarchical.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "variant", "out")},
        "topology": {"nodes": NODES, "nproc_per_node": NPROC},
        "model": {"preset": args.preset, "config": {k: getattr(cfg, k) for k in
                                                    ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}},
        "batch": args.batch, "block": args.block or cfg.block_size,
        "tokens_per_step": args.batch * (args.block or cfg.block_size),
        "optimizer": f"torch.optim.AdamW(lr={LR})", "precision": "fp32",
        "rates": {}, "targets": {},
    }
    port = 29700 + (os.getpid() % 200) * 10
    print(f"model: preset {args.preset} ({cfg.n_layer} layers, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}); "
          f"{results['tokens_per_step']} tokens/step = {args.batch} x {args.block or cfg.block_size}, "
          f"{results['tokens_per_step'] // (NODES * NPROC)} per rank; link share = the busier host's tx bytes "
          f"per step at the link rate / step time", flush=True)
    for rate in args.rates.split(","):
        runs: dict[str, list[dict[str, Any]]] = {}
        with netns.create_hosts(NODES, rate, prefix="dtrain-h") as hosts:
            for rep, name in rotated_schedule(names, args.repeats):
                port += 1
                run = run_once(hosts, name, rate, rep, port, args)
                runs.setdefault(name, []).append(run)
                if run["ok"]:
                    print(f"{rate:>8} {name:>18} #{rep}: step {run['step_s'] * 1e3:8.1f} ms  link "
                          f"{run['link_bytes_per_step'] / 1e6:7.2f} MB/step  comm global "
                          f"{run['bytes_per_step'].get('global', 0) / 1e6:6.2f} MB/rank  link share "
                          f"{_pct(run['link_share'])}  loss {run['losses'][-1]:.4f}  load {run['loadavg_1m']:.1f}",
                          flush=True)
                else:
                    print(f"{rate:>8} {name:>18} #{rep}: FAILED {run['error']}", flush=True)
        results["rates"][rate] = summarize(runs)
        results["targets"][rate] = targets(results["rates"][rate])
        results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        out = Path(args.json) if args.json else RESULTS / ("hierarchical_quick.json" if args.quick else "hierarchical.json")
        write_json(out, results)  # after every rate: a later failure keeps what was measured
    for rate, summary in results["rates"].items():
        for name, s in summary.items():
            if s["status"] != "ok":
                print(f"{rate:>8} {name:>18}: failed: {s['error']}")
                continue
            print(f"{rate:>8} {name:>18}: {s['step_s_median'] * 1e3:8.1f} ms/step  x{s.get('speedup_vs_zero3', 0):.2f}  "
                  f"link share {_pct(s.get('link_share'))}  "
                  f"link {s['link_bytes_per_step'] / 1e6:7.2f} MB/step x{s.get('link_bytes_vs_zero3', 0):.2f}  "
                  f"rss {s['peak_rss_bytes'] / 2**20:6.0f} MiB  loss {s['final_loss']:.4f}")
        for key, t in results["targets"][rate].items():
            print(f"{rate:>8} target {key} ({t['what']}): {t['value']:.3f} {t['op']} {t['limit']} -> "
                  f"{'met' if t['met'] else 'MISSED'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
