"""ZeRO benchmark: dtrain DDP/ZeRO-1/2/3 side by side with FSDP2 and DeepSpeed ZeRO-1/2/3.

Owns the whole ``zero`` benchmark: the per-framework training runners, the worker mode
(one rank of one run), the driver that launches every (framework, precision) run in fresh
processes, interleaved and repeated, and the report (``<out>/zero.json``, ``<out>/zero.png``).

Every framework trains the same GPT (``GPTConfig.preset("bench")`` by default) from the same
seed on the same synthetic token stream with ``torch.optim.AdamW``; only the sharding and
mixed-precision machinery differ. Per run it records the per-step wall time (max over ranks),
the peak RSS (VmHWM, max over ranks), the bytes of params / grads / optimizer state each
rank holds, and the losses. Usage::

    python benchmarks/zero.py                       # full run (world 2, fp32+bf16, all)
    python benchmarks/zero.py --quick --frameworks fsdp2,deepspeed-zero3   # smoke test
    python benchmarks/zero.py --frameworks dtrain-ddp,dtrain-zero3 --baseline main~3   # A/B vs older code

``--baseline REV`` also runs every chosen dtrain framework from a checkout of the git revision REV
(a temporary worktree on ``PYTHONPATH`` of that framework's ranks, named ``<framework>@base``),
interleaved with the current code in the same rounds, and reports each current / baseline step
time ratio (median of the per-round ratios) against a 5 % budget: the check that a change to the
engine left ddp/ZeRO speed alone.

State accounting (the ZeRO paper's convention): ``params`` = working model weights the rank
holds (fp32, or bf16 where the framework keeps a bf16 model copy), ``grads`` = gradient
storage held after the last backward (communication buckets excluded), ``optim`` = optimizer
state incl. a separate fp32 master copy if the framework keeps one. Storages are counted once,
with one helper for every framework, dtrain included (``dtrain.metrics.layout_storage_bytes``;
dtrain's formula is kept as ``state_bytes_formula`` and tests/dist/test_state_bytes.py checks the
two agree), and outside the step clock.
The ideal per-rank figure is 16 bytes/param / world (fp32 weights + fp32 grads + two fp32
AdamW moments, fully sharded).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_util as bu  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"

# name -> (kind, zero stage); the order is the report order.
FRAMEWORKS: dict[str, tuple[str, int | None]] = {
    "dtrain-ddp": ("dtrain", 0),
    "dtrain-zero1": ("dtrain", 1),
    "dtrain-zero2": ("dtrain", 2),
    "dtrain-zero3": ("dtrain", 3),
    "fsdp2": ("fsdp2", None),
    "deepspeed-zero1": ("deepspeed", 1),
    "deepspeed-zero2": ("deepspeed", 2),
    "deepspeed-zero3": ("deepspeed", 3),
    "torch-ddp": ("torch-ddp", None),  # optional reference, not in the default list
}
DEFAULT_FRAMEWORKS = [f for f in FRAMEWORKS if f != "torch-ddp"]
PRECISIONS = ("fp32", "bf16")
IDEAL_BYTES_PER_PARAM = 16  # fp32 param + fp32 grad + AdamW exp_avg + exp_avg_sq

TARGETS = {
    "zero3_vs_best_peer_step_time": {"op": "<=", "value": 0.9},
    "zero1_vs_ddp_step_time": {"op": "<=", "value": 1.10},
    "zero2_vs_ddp_step_time": {"op": "<=", "value": 1.10},
    "zero3_state_vs_ideal": {"op": "abs(x-1)<=", "value": 0.05},
    "vs_baseline_step_time": {"op": "<=", "value": 1.05},
}
BASELINE = "@base"


# =========================================================================== worker side


def make_batches(
    *, vocab: int, seq: int, batch: int, world: int, rank: int, steps: int, seed: int
) -> list[tuple[Any, Any]]:
    """Deterministic synthetic token stream: a random sparse bigram chain (4 successors/token).

    Learnable (loss falls from ln(vocab) toward ln 4), identical for every framework; each
    rank takes its own slice of the global batch.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 12345)
    succ = torch.randint(vocab, (vocab, 4), generator=g)
    out: list[tuple[Any, Any]] = []
    for _ in range(steps):
        n = batch * world
        toks = torch.empty(n, seq + 1, dtype=torch.long)
        toks[:, 0] = torch.randint(vocab, (n,), generator=g)
        choice = torch.randint(4, (n, seq), generator=g)
        for t in range(seq):
            toks[:, t + 1] = succ[toks[:, t], choice[:, t]]
        mine = toks[rank * batch:(rank + 1) * batch]
        out.append((mine[:, :-1].contiguous(), mine[:, 1:].contiguous()))
    return out


class Stopwatch:
    """Times one step; ``paused()`` keeps state accounting (done on the last step) off the clock."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._since = time.perf_counter()

    def stop(self) -> float:
        self.elapsed += time.perf_counter() - self._since
        return self.elapsed

    @contextlib.contextmanager
    def paused(self) -> Any:
        self.stop()
        try:
            yield
        finally:
            self._since = time.perf_counter()


class Runner(Protocol):
    def step(self, x: Any, y: Any, measure: bool, clock: Stopwatch) -> float: ...

    def state_bytes(self) -> dict[str, int]: ...


def _init_pg_gloo() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://")


class DtrainRunner:
    """dtrain via its public API: ``dtrain.wrap`` + ``engine.train_step``."""

    def __init__(self, model: Any, stage: int, precision: str, lr: float) -> None:
        import torch

        import dtrain

        self.engine = dtrain.wrap(
            model,
            optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
            config={"zero": {"stage": stage}, "train": {"precision": precision}},
        )

    def step(self, x: Any, y: Any, measure: bool, clock: Stopwatch) -> float:
        return float(self.engine.train_step({"input_ids": x, "labels": y}))

    def state_bytes(self) -> dict[str, int]:
        """Measured from storage exactly as for the peers (the layout keeps its gradient buffers
        between steps, so this after the last step is what a step holds)."""
        try:
            from dtrain.metrics import layout_storage_bytes
        except ImportError:  # a --baseline checkout older than the helper: its formula
            return self.state_bytes_formula()
        return layout_storage_bytes(self.engine.model, self.engine.layout)

    def state_bytes_formula(self) -> dict[str, int]:
        sb = self.engine.state_bytes()
        return {k: int(sb.get(k, 0)) for k in ("params", "grads", "optim")}


class _TorchModuleRunner:
    """Shared step and state accounting for peers that are plain torch modules + torch AdamW."""

    model: Any
    opt: Any
    autocast_bf16 = False  # FSDP2 casts through its MixedPrecisionPolicy instead
    _grad_bytes = 0

    def step(self, x: Any, y: Any, measure: bool, clock: Stopwatch) -> float:
        import torch

        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            loss = self.model(input_ids=x, labels=y)
        loss.backward()
        if measure:
            with clock.paused():  # gradients exist only between backward and the next zero_grad
                self._grad_bytes = bu.tensor_storage_bytes(p.grad for p in self.model.parameters())
        self.opt.step()
        return float(loss.detach())

    def state_bytes(self) -> dict[str, int]:
        seen: set[int] = set()
        params = bu.tensor_storage_bytes(self.model.parameters(), seen)
        optim = bu.tensor_storage_bytes(bu.iter_tensors(dict(self.opt.state)), seen)
        return {"params": params, "grads": self._grad_bytes, "optim": optim}


class Fsdp2Runner(_TorchModuleRunner):
    """FSDP2: ``fully_shard`` on every transformer block, then on the root. ``mesh``: a 2-D
    ``DeviceMesh`` (replicate, shard) makes it HSDP (benchmarks/hierarchical.py); None = 1-D."""

    def __init__(self, model: Any, precision: str, lr: float, mesh: Any = None) -> None:
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        _init_pg_gloo()
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if precision == "bf16"
            else MixedPrecisionPolicy()
        )
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)



class TorchDdpRunner(_TorchModuleRunner):
    """Reference: torch DistributedDataParallel (+ autocast for bf16)."""

    def __init__(self, model: Any, precision: str, lr: float) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        _init_pg_gloo()
        self.model = DDP(model)
        self.autocast_bf16 = precision == "bf16"
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)


# DeepSpeed optimizer-wrapper attributes holding each kind of state (ZeRO-1/2, ZeRO-3, BF16).
_DS_MASTER_ATTRS = (
    "single_partition_of_fp32_groups",  # ZeRO-1/2
    "fp32_partitioned_groups_flat",  # ZeRO-3
    "fp32_groups_flat_partition",  # BF16_Optimizer (bf16 + ZeRO-1)
)
_DS_GRAD_ATTRS = (
    "averaged_gradients",
    "grads_in_partition",
    "grad_partitions_flat_buffer",
    "fp32_groups_gradients_flat",
    "fp32_groups_gradient_flat_partition",
)


class DeepSpeedRunner:
    """DeepSpeed ZeRO-{1,2,3} with a client ``torch.optim.AdamW`` (no fused CPU Adam).
    ``zero_extra``: more ``zero_optimization`` keys (ZeRO++ ``zero_hpz_partition_size``, ...)."""

    def __init__(self, model: Any, stage: int, precision: str, lr: float, batch: int,
                 zero_extra: dict[str, Any] | None = None) -> None:
        import torch
        import deepspeed

        _init_pg_gloo()
        deepspeed.init_distributed(dist_backend="gloo")
        config = {
            "train_micro_batch_size_per_gpu": batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, **(zero_extra or {})},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": precision == "bf16"},
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=config
        )
        self.stage = stage
        self._grad_bytes = 0
        self._grad_seen: set[int] = set()

    def _param_tensors(self) -> list[Any]:
        out = []
        for p in self.engine.module.parameters():
            ds_tensor = getattr(p, "ds_tensor", None)
            if ds_tensor is not None:
                out.append(ds_tensor)
            out.append(p.data)  # empty for partitioned ZeRO-3 params; full if persistent
        return out

    def _attr_tensors(self, names: tuple[str, ...]) -> list[Any]:
        out: list[Any] = []
        for name in names:
            out.extend(bu.iter_tensors(getattr(self.opt, name, None)))
        return out

    def step(self, x: Any, y: Any, measure: bool, clock: Stopwatch) -> float:
        loss = self.engine(input_ids=x, labels=y)
        self.engine.backward(loss)
        if measure:
            with clock.paused():
                seen: set[int] = set()
                # storages that are params / master weights are not grads
                bu.tensor_storage_bytes(self._param_tensors(), seen)
                masters = self._attr_tensors(_DS_MASTER_ATTRS)
                bu.tensor_storage_bytes(masters, seen)
                grads = [p.grad for p in self.engine.module.parameters()]
                grads += [getattr(m, "grad", None) for m in masters]
                grads += self._attr_tensors(_DS_GRAD_ATTRS)
                self._grad_bytes = bu.tensor_storage_bytes(grads, seen)
        self.engine.step()
        return float(loss.detach().float())

    def state_bytes(self) -> dict[str, int]:
        seen: set[int] = set()
        params = bu.tensor_storage_bytes(self._param_tensors(), seen)
        master = bu.tensor_storage_bytes(self._attr_tensors(_DS_MASTER_ATTRS), seen)
        inner = getattr(self.opt, "optimizer", self.opt)
        moments = bu.tensor_storage_bytes(bu.iter_tensors(dict(inner.state)), seen)
        return {"params": params, "grads": self._grad_bytes, "optim": master + moments}


def build_runner(name: str, model: Any, spec: dict[str, Any]) -> Runner:
    kind, stage = FRAMEWORKS[name.removesuffix(BASELINE)]
    precision, lr = spec["precision"], spec["lr"]
    if kind == "dtrain":
        assert stage is not None
        return DtrainRunner(model, stage, precision, lr)
    if kind == "fsdp2":
        return Fsdp2Runner(model, precision, lr)
    if kind == "deepspeed":
        assert stage is not None
        return DeepSpeedRunner(model, stage, precision, lr, spec["batch"])
    if kind == "torch-ddp":
        return TorchDdpRunner(model, precision, lr)
    raise ValueError(f"unknown framework {name!r}")


def worker_main(spec: dict[str, Any]) -> None:
    """One rank of one (framework, precision) run; writes ``rank<r>.json`` to result_dir."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(1)
    from dtrain.models import GPT, GPTConfig

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = GPTConfig.preset(spec["preset"])
    torch.manual_seed(spec["seed"])
    model = GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())  # tied weight counted once
    steps = spec["warmup"] + spec["steps"]
    batches = make_batches(vocab=cfg.vocab_size, seq=spec["seq"], batch=spec["batch"],
                           world=world, rank=rank, steps=steps, seed=spec["seed"])
    rss_before_wrap = bu.current_rss_bytes()
    t_setup = time.perf_counter()
    runner = build_runner(spec["framework"], model, spec)
    setup_s = time.perf_counter() - t_setup

    times: list[float] = []
    losses: list[float] = []
    for i, (x, y) in enumerate(batches):
        clock = Stopwatch()
        losses.append(runner.step(x, y, measure=(i == steps - 1), clock=clock))
        times.append(clock.stop())
    state = runner.state_bytes()
    formula = getattr(runner, "state_bytes_formula", None)

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    result = {
        "rank": rank,
        "world": world,
        "n_params": n_params,
        "setup_s": setup_s,
        "step_times_s": times,
        "losses": losses,
        "state_bytes": state,
        "state_bytes_formula": formula() if formula else None,
        "rss_before_wrap_bytes": rss_before_wrap,
        "peak_rss_bytes": bu.peak_rss_bytes(),
    }
    bu.write_json(Path(spec["result_dir"]) / f"rank{rank}.json", result)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# =========================================================================== driver side


@dataclass
class RunSpec:
    framework: str
    precision: str
    round: int


def run_one(run: RunSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Launch one (framework, precision) run in fresh processes and aggregate the ranks."""
    result_dir = Path(tempfile.mkdtemp(prefix="zero_bench_"))
    spec = {
        "framework": run.framework,
        "precision": run.precision,
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "lr": args.lr,
        "result_dir": str(result_dir),
    }
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if run.framework.endswith(BASELINE):  # the baseline's dtrain shadows the installed one
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.baseline_tree, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    load_before = os.getloadavg()[0]
    outcome = bu.run_rank_group(argv, args.world, timeout_s=args.timeout, env=env)
    rec: dict[str, Any] = {
        "framework": run.framework,
        "precision": run.precision,
        "round": run.round,
        "ok": False,
        "wall_s": round(outcome.wall_s, 2),
        # 1-min load average before/after: other jobs on the host inflate step times
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    rank_results: list[dict[str, Any]] = []
    for r in range(args.world):
        f = result_dir / f"rank{r}.json"
        if f.exists():
            rank_results.append(json.loads(f.read_text()))
        try:
            f.unlink()
        except OSError:
            pass
    try:
        result_dir.rmdir()
    except OSError:
        pass
    if not outcome.ok or len(rank_results) != args.world:
        rec["error"] = outcome.error or "missing rank results"
        rec["timed_out"] = outcome.timed_out
        return rec
    w = args.warmup
    per_step = [max(rr["step_times_s"][i] for rr in rank_results)
                for i in range(len(rank_results[0]["step_times_s"]))]
    losses = [sum(rr["losses"][i] for rr in rank_results) / len(rank_results)
              for i in range(len(rank_results[0]["losses"]))]
    states = [rr["state_bytes"] for rr in rank_results]
    state_max = {k: max(int(s.get(k, 0)) for s in states) for k in ("params", "grads", "optim")}
    rec.update(
        ok=True,
        n_params=rank_results[0]["n_params"],
        step_times_s=per_step,
        step_time_s=bu.median_or_none(per_step[w:]),
        losses=losses,
        final_loss=losses[-1],
        setup_s=max(rr["setup_s"] for rr in rank_results),
        peak_rss_bytes=max(rr["peak_rss_bytes"] or 0 for rr in rank_results),
        rss_before_wrap_bytes=max(rr["rss_before_wrap_bytes"] or 0 for rr in rank_results),
        state_bytes=state_max,
        state_bytes_per_rank=states,
        state_bytes_formula_per_rank=[rr.get("state_bytes_formula") for rr in rank_results],
    )
    return rec


def _check_target(name: str, x: float | None) -> bool | None:
    if x is None:
        return None
    t = TARGETS[name]
    if t["op"] == "<=":
        return x <= t["value"]
    return abs(x - 1.0) <= t["value"]


def aggregate(runs: list[dict[str, Any]], frameworks: list[str], precisions: list[str],
              world: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per (precision, framework) medians over repeats, and the target ratios."""
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    n_params = next((r["n_params"] for r in runs if r.get("ok")), None)
    ideal = None if n_params is None else IDEAL_BYTES_PER_PARAM * n_params / world
    for prec in precisions:
        results[prec] = {}
        for fw in frameworks:
            mine = [r for r in runs if r["framework"] == fw and r["precision"] == prec]
            good = [r for r in mine if r.get("ok")]
            entry: dict[str, Any] = {
                "status": "ok" if good else "failed",
                "runs_ok": len(good),
                "runs_total": len(mine),
            }
            errors = sorted({r["error"] for r in mine if not r.get("ok")})
            if errors:
                entry["errors"] = errors
            if good:
                sb = {k: int(bu.median_or_none(r["state_bytes"][k] for r in good) or 0)
                      for k in ("params", "grads", "optim")}
                total = sum(sb.values())
                entry.update(
                    step_time_s=bu.summarize([r["step_time_s"] for r in good]),
                    peak_rss_bytes=bu.summarize([r["peak_rss_bytes"] for r in good]),
                    rss_before_wrap_bytes=bu.median_or_none(
                        r["rss_before_wrap_bytes"] for r in good),
                    setup_s=bu.median_or_none(r["setup_s"] for r in good),
                    loadavg_1m_after=bu.median_or_none(r["loadavg_1m"][1] for r in good),
                    state_bytes=sb,
                    state_total_bytes=total,
                    state_vs_ideal=bu.safe_ratio(total, ideal),
                    final_loss=bu.median_or_none(r["final_loss"] for r in good),
                    first_loss=bu.median_or_none(r["losses"][0] for r in good),
                )
            results[prec][fw] = entry

        def med(fw: str) -> float | None:
            e = results[prec].get(fw)
            return e["step_time_s"]["median"] if e and e["status"] == "ok" else None

        peers = [v for v in (med("deepspeed-zero3"), med("fsdp2")) if v is not None]
        z3 = results[prec].get("dtrain-zero3", {})
        r: dict[str, Any] = {
            "zero3_vs_best_peer_step_time": bu.safe_ratio(med("dtrain-zero3"),
                                                          min(peers) if peers else None),
            "zero1_vs_ddp_step_time": bu.safe_ratio(med("dtrain-zero1"), med("dtrain-ddp")),
            "zero2_vs_ddp_step_time": bu.safe_ratio(med("dtrain-zero2"), med("dtrain-ddp")),
            "zero3_state_vs_ideal": z3.get("state_vs_ideal"),
        }
        ratios[prec] = {k: {"value": v, "target": TARGETS[k], "met": _check_target(k, v)}
                        for k, v in r.items()}
        for fw in frameworks:
            if fw + BASELINE in frameworks:
                v = _paired_ratio(runs, fw, fw + BASELINE, prec)
                ratios[prec][f"{fw}_vs_baseline_step_time"] = {
                    "value": v, "target": TARGETS["vs_baseline_step_time"],
                    "met": _check_target("vs_baseline_step_time", v)}
        finals = {fw: e["final_loss"] for fw, e in results[prec].items() if e["status"] == "ok"}
        if finals:
            mid = bu.median_or_none(finals.values())
            assert mid is not None
            ratios[prec]["loss_check"] = {
                "median_final_loss": mid,
                "max_abs_dev": max(abs(v - mid) for v in finals.values()),
                "per_framework": finals,
            }
    return results, ratios


def _paired_ratio(runs: list[dict[str, Any]], fw: str, base: str, prec: str) -> float | None:
    """Median over rounds of fw's step time / base's step time in the same round."""
    times = {(r["framework"], r["round"]): r["step_time_s"] for r in runs
             if r.get("ok") and r["precision"] == prec and r["framework"] in (fw, base)}
    rounds = sorted({rnd for _, rnd in times})
    return bu.median_or_none(bu.safe_ratio(times.get((fw, rnd)), times.get((base, rnd))) for rnd in rounds)


def write_png(path: Path, results: dict[str, Any], frameworks: list[str],
              precisions: list[str], title: str) -> None:
    def series(key: str, scale: float) -> tuple[dict[str, list[float | None]],
                                                dict[str, list[tuple[float, float] | None]]]:
        vals: dict[str, list[float | None]] = {}
        errs: dict[str, list[tuple[float, float] | None]] = {}
        for prec in precisions:
            vals[prec], errs[prec] = [], []
            for fw in frameworks:
                e = results[prec][fw]
                if e["status"] != "ok":
                    vals[prec].append(None)
                    errs[prec].append(None)
                    continue
                s = e[key]
                vals[prec].append(s["median"] / scale)
                errs[prec].append((s["min"] / scale, s["max"] / scale))
        return vals, errs

    t_vals, t_errs = series("step_time_s", 1.0)
    m_vals, m_errs = series("peak_rss_bytes", 2**20)
    s_vals = {prec: [(results[prec][fw]["state_total_bytes"] / 2**20
                      if results[prec][fw]["status"] == "ok" else None) for fw in frameworks]
              for prec in precisions}
    panels = [
        bu.BarPanel("median step time (bars: min..max over repeats)", "seconds / step",
                    frameworks, t_vals, t_errs),
        bu.BarPanel("peak RSS per rank (VmHWM, max over ranks)", "MiB", frameworks,
                    m_vals, m_errs),
        bu.BarPanel("params+grads+optimizer state held per rank", "MiB", frameworks, s_vals),
    ]
    bu.write_bar_png(path, panels, suptitle=title)


def markdown_report(doc: dict[str, Any]) -> str:
    """Markdown tables (per precision) and the target ratios from a ``zero.json`` document."""
    lines: list[str] = []
    ideal = doc["theory"].get("ideal_state_bytes_per_rank")
    for prec in doc["config"]["precisions"]:
        lines += [f"**{prec}**", "",
                  "| framework | step time s, median (min–max) | peak RSS MiB / rank | "
                  "state MiB / rank (params / grads / optim) | state ÷ ideal | final loss |",
                  "|---|---|---|---|---|---|"]
        for fw in doc["config"]["frameworks"]:
            e = doc["results"][prec][fw]
            if e["status"] != "ok":
                err = e.get("errors", ["?"])[0].strip().splitlines()[-1][:120].replace("|", "/")
                lines.append(f"| {fw} | failed: {err} | | | | |")
                continue
            st, rss, sb = e["step_time_s"], e["peak_rss_bytes"], e["state_bytes"]
            mib = 2**20
            lines.append(
                f"| {fw} | {st['median']:.3f} ({st['min']:.3f}–{st['max']:.3f}) | "
                f"{rss['median'] / mib:.0f} | {e['state_total_bytes'] / mib:.1f} "
                f"({sb['params'] / mib:.1f} / {sb['grads'] / mib:.1f} / {sb['optim'] / mib:.1f}) | "
                f"{e['state_vs_ideal']:.3f} | {e['final_loss']:.4f} |")
        lines.append("")
        lines += ["| ratio | value | target | met |", "|---|---|---|---|"]
        for k, v in doc["ratios"][prec].items():
            if k == "loss_check":
                continue
            val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
            tgt = (f"≤ {v['target']['value']}" if v["target"]["op"] == "<="
                   else f"1 ± {v['target']['value']}")
            met = {True: "yes", False: "**no**", None: "n/a"}[v["met"]]
            lines.append(f"| {k} | {val} | {tgt} | {met} |")
        lc = doc["ratios"][prec].get("loss_check")
        if lc:
            lines += ["", f"Final-loss spread across frameworks: max |loss − median| = "
                          f"{lc['max_abs_dev']:.4f} (median {lc['median_final_loss']:.4f})."]
        lines.append("")
    if ideal:
        lines.append(f"Ideal state per rank = 16 B × {doc['theory']['n_params_unique']:,} params / "
                     f"{doc['config']['world']} = {ideal / 2**20:.1f} MiB.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="ranks per run (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 6)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="passes over all runs, rotating the order (default 3)")
    ap.add_argument("--precision", default="fp32,bf16", help="comma list of fp32,bf16")
    ap.add_argument("--frameworks", default="all",
                    help=f"comma list or 'all' (= {','.join(DEFAULT_FRAMEWORKS)}); "
                         f"also: torch-ddp")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, 2 steps, 1 repeat: a smoke test")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    ap.add_argument("--batch", type=int, default=None, help="sequences per rank (default 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256)")
    ap.add_argument("--preset", default=None, help="GPT preset (default bench; quick: tiny)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None,
                    help="per-run timeout in seconds (default 420; quick: 180)")
    ap.add_argument("--markdown", action="store_true",
                    help="print markdown tables from <out>/zero.json and exit (no runs)")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also run the chosen dtrain frameworks from git revision REV, interleaved, "
                         "and report current/baseline step-time ratios")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {"steps": 2 if q else 6, "warmup": 1 if q else 2, "repeats": 1 if q else 3,
                "batch": 2, "seq": 32 if q else 256,
                "preset": "tiny" if q else "bench", "timeout": 180.0 if q else 420.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(json.loads(args.worker))
        return 0
    if args.markdown:
        print(markdown_report(json.loads((Path(args.out) / "zero.json").read_text())))
        return 0
    frameworks = DEFAULT_FRAMEWORKS if args.frameworks == "all" else [
        f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = [f for f in frameworks if f not in FRAMEWORKS]
    args.baseline_tree = None
    if args.baseline and not unknown:
        args.baseline_tree = _baseline_tree(args.baseline)
        frameworks += [fw + BASELINE for fw in frameworks if FRAMEWORKS[fw][0] == "dtrain"]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad_prec = [p for p in precisions if p not in PRECISIONS]
    if unknown or bad_prec:
        print(f"unknown frameworks {unknown} / precisions {bad_prec}; "
              f"choose from {list(FRAMEWORKS)} / {list(PRECISIONS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    items = [(fw, p) for p in precisions for fw in frameworks]
    schedule = bu.rotated_schedule(items, args.repeats)
    runs: list[dict[str, Any]] = []
    t_start = time.time()
    for i, (rnd, (fw, prec)) in enumerate(schedule):
        rec = run_one(RunSpec(fw, prec, rnd), args)
        runs.append(rec)
        if rec["ok"]:
            msg = (f"step {rec['step_time_s']:.3f}s  peak_rss {rec['peak_rss_bytes']/2**20:.0f}MiB"
                   f"  state {sum(rec['state_bytes'].values())/2**20:.1f}MiB"
                   f"  loss {rec['final_loss']:.4f}")
        else:
            msg = "FAILED: " + rec["error"].strip().splitlines()[-1][:200]
        print(f"[{i + 1}/{len(schedule)}] round {rnd} {fw:16s} {prec}: {msg} "
              f"({rec['wall_s']:.0f}s, load {rec['loadavg_1m'][0]:.1f}->{rec['loadavg_1m'][1]:.1f})",
              flush=True)
    results, ratios = aggregate(runs, frameworks, precisions, args.world)
    n_params = next((r["n_params"] for r in runs if r.get("ok")), None)
    doc = {
        "benchmark": "zero",
        "command": " ".join(["python", "benchmarks/zero.py", *(sys.argv[1:] if argv is None
                                                                else argv)]),
        "started_unix": t_start,
        "elapsed_s": round(time.time() - t_start, 1),
        "machine": bu.machine_info(extra_modules=("deepspeed", "numpy")),
        "config": {k: getattr(args, k) for k in ("world", "steps", "warmup", "repeats", "batch",
                                                 "seq", "preset", "lr", "seed", "timeout",
                                                 "quick", "baseline")}
        | {"frameworks": frameworks, "precisions": precisions, "backend": "gloo",
           "threads_per_rank": 1, "optimizer": "torch.optim.AdamW"},
        "theory": {
            "n_params_unique": n_params,
            "ideal_bytes_per_param": IDEAL_BYTES_PER_PARAM,
            "ideal_state_bytes_per_rank": (None if n_params is None else
                                           IDEAL_BYTES_PER_PARAM * n_params / args.world),
        },
        "results": results,
        "ratios": ratios,
        "runs": runs,
    }
    bu.write_json(out / "zero.json", doc)
    try:
        write_png(out / "zero.png", results, frameworks, precisions,
                  f"dtrain ZeRO vs FSDP2 vs DeepSpeed — world {args.world}, "
                  f"{args.preset}, {args.batch}x{args.seq} tok/rank, gloo CPU")
    except Exception:  # noqa: BLE001 - the JSON is the primary artefact
        traceback.print_exc()
    print_summary(results, ratios, precisions, frameworks)
    print(f"wrote {out / 'zero.json'} and {out / 'zero.png'}")
    return 0


def _baseline_tree(rev: str) -> str:
    """A detached worktree of ``rev`` in a temporary directory (removed at exit)."""
    import atexit
    import subprocess

    tree = tempfile.mkdtemp(prefix="zero_baseline_")
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-f", tree, rev],
                   check=True, capture_output=True)
    atexit.register(subprocess.run, ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", tree],
                    capture_output=True)
    return tree


def print_summary(results: dict[str, Any], ratios: dict[str, Any], precisions: list[str],
                  frameworks: list[str]) -> None:
    for prec in precisions:
        print(f"\n== {prec} ==")
        print(f"{'framework':18s} {'step s':>8s} {'peakRSS MiB':>12s} {'state MiB':>10s} "
              f"{'vs ideal':>8s} {'final loss':>10s}")
        for fw in frameworks:
            e = results[prec][fw]
            if e["status"] != "ok":
                print(f"{fw:18s} FAILED: {e.get('errors', ['?'])[0].strip().splitlines()[-1][:90]}")
                continue
            print(f"{fw:18s} {e['step_time_s']['median']:8.3f} "
                  f"{e['peak_rss_bytes']['median'] / 2**20:12.0f} "
                  f"{e['state_total_bytes'] / 2**20:10.1f} {e['state_vs_ideal']:8.3f} "
                  f"{e['final_loss']:10.4f}")
        for k, v in ratios[prec].items():
            if k == "loss_check":
                print(f"  loss spread (max |final - median|): {v['max_abs_dev']:.4f}")
            else:
                val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
                print(f"  {k}: {val} (target {v['target']['op']} {v['target']['value']}, "
                      f"met={v['met']})")


if __name__ == "__main__":
    sys.exit(main())
