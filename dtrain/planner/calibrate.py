"""Calibration: measure the cost model's alpha, beta and v(d) on this machine and save them.

Workers are spawned with ``torch.multiprocessing`` (one process per device, one thread each;
gloo on 127.0.0.1 on CPU, NCCL when CUDA is available). With a small transformer layer
(hidden ``h``, ``heads``) at several sequence lengths ``s``:

1. attention core (causal SDPA, fwd+bwd) on one device: ``t = a s^2 + c_1``;
2. the rest of the layer (QKV/out projections, MLP, norms; attention replaced by identity):
   ``t = b s + c_2``;
3. ``all_to_all_single`` of ``B`` bytes per device across ``d`` processes:
   ``t = lat + B (d-1)/d / v``.

Least squares gives ``F_attn = 6 h / a``, ``F_lin = 72 h^2 / b`` (the FLOP conventions of
:mod:`dtrain.planner.shapes` for one layer), ``beta = c_1 + c_2`` per layer, ``lat`` and
``v(d)``. The fitted model is then checked against *separate* measured runs: the full layer
at ``d = 1`` and a real Ulysses layer (4 all-to-alls forward, 4 backward) at every measured
``d > 1``; the report lists the relative errors (target <= 10%).
"""
from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, Sequence

import numpy as np

from dtrain.planner.cluster import ClusterSpec
from dtrain.planner.errors import PlannerError

HIDDEN, HEADS = 256, 4


@dataclass
class CalibrationReport:
    """Fitted parameters, the validation runs and where the cluster file was written."""

    out_path: str
    device: str
    backend: str
    degrees: list[int]
    attention_TFLOPS: float
    linear_TFLOPS: float
    overhead_us_per_layer: float
    alltoall_GBps: dict[int, float]
    latency_us: dict[int, float]
    validation: list[dict[str, float]] = field(default_factory=list)
    fit_errors: dict[str, float] = field(default_factory=dict)  # max |rel. residual| per fit
    fit_residuals: list[float] = field(default_factory=list)  # every fitted point's rel. residual
    seconds: float = 0.0

    @property
    def max_error(self) -> float:
        return max((abs(v["rel_error"]) for v in self.validation), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_error"] = self.max_error
        return d

    def summary(self) -> str:
        lines = [
            f"calibrated on {self.device} ({self.backend}), d in {self.degrees}, "
            f"{self.seconds:.1f} s; wrote {self.out_path}",
            f"  attention {self.attention_TFLOPS * 1e3:.2f} GFLOP/s, dense {self.linear_TFLOPS * 1e3:.2f} "
            f"GFLOP/s, overhead {self.overhead_us_per_layer:.0f} us/layer/sequence",
        ]
        for d in sorted(self.alltoall_GBps):
            lines.append(
                f"  all-to-all d={d}: {self.alltoall_GBps[d]:.2f} GB/s, latency {self.latency_us[d]:.0f} us"
            )
        lines.append("  model vs measured (one layer, fwd+bwd):")
        for v in self.validation:
            lines.append(
                f"    d={int(v['d'])} s={int(v['s']):5d}: measured {v['measured_s'] * 1e3:8.2f} ms, "
                f"model {v['predicted_s'] * 1e3:8.2f} ms, error {100 * v['rel_error']:+.1f}%"
            )
        fits = ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(self.fit_errors.items()))
        lines.append(f"  fit residuals (max, on the fitted points): {fits}")
        verdict = "OK" if self.max_error <= 0.10 else (
            "ABOVE the 10% target; on a shared or loaded host rerun when it is idle"
        )
        lines.append(f"  max error {100 * self.max_error:.1f}% ({verdict})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- workers
def _layer(torch: Any, device: str) -> Any:
    nn = torch.nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
            self.fc1, self.fc2 = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

    return Layer().to(device)


def _a2a_fn(torch: Any, dist: Any, group: Any) -> Any:
    class AllToAll(torch.autograd.Function):
        """All-to-all over dim 0 (chunk j goes to rank j of ``group``); its own adjoint."""

        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x.contiguous(), group=group)
            return out

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            out = torch.empty_like(g)
            dist.all_to_all_single(out, g.contiguous(), group=group)
            return out

    return AllToAll.apply


def _ulysses_step(torch: Any, layer: Any, x: Any, d: int, a2a: Any, attention: bool = True) -> None:
    """One Ulysses layer fwd+bwd on local tokens ``x`` (s/d, h); ``d = 1`` is a plain layer."""
    F = torch.nn.functional
    s_loc, hd = x.shape[0], HIDDEN // HEADS
    h = layer.ln1(x)
    q, k, v = layer.qkv(h).split(HIDDEN, dim=1)
    if attention:
        def seq_to_head(t: Any) -> Any:
            t = t.reshape(s_loc, d, HEADS // d, hd).permute(1, 0, 2, 3)
            if d > 1:
                t = a2a(t)
            return t.reshape(d * s_loc, HEADS // d, hd).transpose(0, 1).unsqueeze(0)

        o = F.scaled_dot_product_attention(seq_to_head(q), seq_to_head(k), seq_to_head(v), is_causal=True)
        o = o.squeeze(0).transpose(0, 1).reshape(d, s_loc, HEADS // d, hd)
        if d > 1:
            o = a2a(o)
        o = o.permute(1, 0, 2, 3).reshape(s_loc, HIDDEN)
    else:
        o = v
    x = x + layer.proj(o)
    y = x + layer.fc2(F.gelu(layer.fc1(layer.ln2(x))))
    y.sum().backward()


def _timeit(torch: Any, dist: Any, fn: Any, repeats: int, sync: Any, group: Any = None) -> float:
    """Fastest of ``repeats`` runs after a warm-up (robust to interference on a shared host);
    every participating rank runs ``fn`` at the same time and the slowest rank counts."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        dist.barrier(group=group)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
        best = min(best, float(dt))
    return best


def _worker(rank: int, world: int, port: int, sizes: list[int], msg_bytes: list[int],
            repeats: int, result_path: str) -> None:
    """All ranks measure single-device kernels concurrently (so every "device" is as busy as
    in training), then each ``d > 1`` runs all-to-alls and Ulysses layers on ranks ``0..d-1``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    layer = _layer(torch, device)
    hd = HIDDEN // HEADS
    out: dict[str, Any] = {"attn": {}, "rest": {}, "layer": {1: {}}, "a2a": {}}
    for s in sizes:
        x = torch.randn(s, HIDDEN, device=device, requires_grad=True)
        qkv = [torch.randn(1, HEADS, s, hd, device=device, requires_grad=True) for _ in range(3)]

        def attn() -> None:
            torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True).sum().backward()

        out["attn"][s] = _timeit(torch, dist, attn, repeats, sync)
        out["rest"][s] = _timeit(
            torch, dist, lambda: _ulysses_step(torch, layer, x, 1, None, attention=False), repeats, sync
        )
        out["layer"][1][s] = _timeit(torch, dist, lambda: _ulysses_step(torch, layer, x, 1, None), repeats, sync)
    d = 2
    while d <= world:
        group = dist.new_group(list(range(d)))  # collective: every rank calls it
        out["layer"][d], out["a2a"][d] = {}, {}
        if rank < d:
            a2a = _a2a_fn(torch, dist, group)
            for s in sizes:
                x = torch.randn(s // d, HIDDEN, device=device, requires_grad=True)
                out["layer"][d][s] = _timeit(
                    torch, dist, lambda: _ulysses_step(torch, layer, x, d, a2a), repeats, sync, group
                )
            for nbytes in msg_bytes:
                buf = torch.randn(nbytes // 4, device=device)
                res = torch.empty_like(buf)
                out["a2a"][d][nbytes] = _timeit(
                    torch, dist, lambda: dist.all_to_all_single(res, buf, group=group), repeats, sync, group
                )
        dist.barrier()
        d *= 2
    if rank == 0:
        torch.save(out, result_path)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(world: int, sizes: list[int], msg_bytes: list[int], repeats: int) -> dict[str, Any]:
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, _free_port(), sizes, msg_bytes, repeats, path), nprocs=world, join=True)
        return torch.load(path)


# ----------------------------------------------------------------------------- fitting
def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares of the *relative* residual of ``y = slope * x + intercept`` (both >= 0)."""
    w = 1.0 / y
    a = np.stack([x * w, w], axis=1)
    slope, intercept = np.linalg.lstsq(a, np.ones_like(y), rcond=None)[0]
    if intercept < 0:
        slope, intercept = float(np.sum(x * w) / np.sum((x * w) ** 2)), 0.0
    return max(float(slope), 1e-30), max(float(intercept), 0.0)


def calibrate(out_path: str | Path, max_degree: int = 2, quick: bool = False) -> CalibrationReport:
    """Measure, fit, validate, and write a cluster TOML to ``out_path`` (see module docstring)."""
    import torch

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    available = torch.cuda.device_count() if cuda else (os.cpu_count() or 1)
    if max_degree < 1 or max_degree & (max_degree - 1):
        raise PlannerError(f"--max-degree {max_degree} must be a power of two >= 1")
    if max_degree > available:
        raise PlannerError(
            f"--max-degree {max_degree} exceeds the {available} "
            f"{'GPUs' if cuda else 'CPU cores'} of this machine; use at most {available}"
        )
    sizes = [512, 1024, 2048] if quick else [512, 1024, 1536, 2048]
    msg_bytes = [1 << 18, 1 << 20, 1 << 22] if quick else [1 << 18, 1 << 20, 1 << 22, 1 << 24]
    repeats = 5
    degrees = [d for d in (1, 2, 4, 8, 16) if d <= max_degree]
    run = _run(max_degree, sizes, msg_bytes, repeats)

    s = np.asarray(sizes, dtype=np.float64)
    a, c1 = _fit(s * s, np.asarray([run["attn"][k] for k in sizes]))
    b, c2 = _fit(s, np.asarray([run["rest"][k] for k in sizes]))
    beta = c1 + c2
    bw: dict[int, float] = {}
    lat: dict[int, float] = {}
    for d in degrees[1:]:
        sent = np.asarray([m * (d - 1) / d for m in msg_bytes], dtype=np.float64)
        inv_bw, lat[d] = _fit(sent, np.asarray([run["a2a"][d][m] for m in msg_bytes]))
        bw[d] = 1.0 / inv_bw

    residuals: list[float] = []

    def max_rel(pred: np.ndarray, meas: np.ndarray) -> float:
        rel = (pred - meas) / meas
        residuals.extend(float(r) for r in rel)
        return float(np.max(np.abs(rel)))

    fit_errors = {
        "attention": max_rel(a * s * s + c1, np.asarray([run["attn"][k] for k in sizes])),
        "dense": max_rel(b * s + c2, np.asarray([run["rest"][k] for k in sizes])),
    }
    for d in degrees[1:]:
        sent = np.asarray([m * (d - 1) / d for m in msg_bytes], dtype=np.float64)
        fit_errors[f"alltoall_d{d}"] = max_rel(
            lat[d] + sent / bw[d], np.asarray([run["a2a"][d][m] for m in msg_bytes])
        )
    validation = []
    for d in degrees:
        for k in sizes:
            pred = (a * k * k + b * k) / d + beta
            if d > 1:
                pred += 8 * (lat[d] + k * HIDDEN * 4 * (d - 1) / (d * d) / bw[d])
            meas = run["layer"][d][k]
            validation.append({"d": d, "s": k, "measured_s": meas, "predicted_s": pred,
                               "rel_error": (pred - meas) / meas})

    f_attn, f_lin = 6 * HIDDEN / a, 72 * HIDDEN * HIDDEN / b
    mem_gib = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 1024**3 / max_degree
    if cuda:
        mem_gib = torch.cuda.get_device_properties(0).total_memory / 1024**3
    top_bw = bw.get(max_degree, max(bw.values(), default=10e9))
    top_lat = lat.get(max_degree, 0.0)
    report = CalibrationReport(
        out_path=str(out_path), device=torch.cuda.get_device_name(0) if cuda else "cpu",
        backend="nccl" if cuda else "gloo", degrees=degrees,
        attention_TFLOPS=f_attn / 1e12, linear_TFLOPS=f_lin / 1e12,
        overhead_us_per_layer=beta * 1e6,
        alltoall_GBps={d: v / 1e9 for d, v in bw.items()},
        latency_us={d: v * 1e6 for d, v in lat.items()}, validation=validation,
        fit_errors=fit_errors, fit_residuals=residuals,
    )
    spec = ClusterSpec(
        name="cpu_local" if not cuda else "local_gpus",
        description=f"measured by `dtrain plan calibrate` on {report.device} ({report.backend}), "
        f"{max_degree} processes",
        num_devices=max_degree, devices_per_node=max_degree,
        memory_GiB=round(mem_gib, 2), reserve_GiB=round(min(2.0, mem_gib / 4), 2),
        linear_TFLOPS=report.linear_TFLOPS, attention_TFLOPS=report.attention_TFLOPS,
        overhead_us_per_layer=report.overhead_us_per_layer,
        intra_node_GBps=top_bw / 1e9, inter_node_GBps=top_bw / 1e9,
        intra_node_latency_us=top_lat * 1e6, inter_node_latency_us=top_lat * 1e6,
        bytes_per_element=2 if cuda else 4, alltoall_GBps=dict(report.alltoall_GBps),
        calibration={
            "hidden": HIDDEN, "heads": HEADS, "seq_lengths": sizes,
            "alpha1_s_per_token2_per_layer": a, "alpha2_s_per_token_per_layer": b,
            "beta_s_per_layer": beta, "max_rel_error": round(report.max_error, 4),
        },
    )
    report.seconds = time.perf_counter() - t_start
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(spec.to_toml())
    return report


# ----------------------------------------------------------------------------- zero levels
# `dtrain plan calibrate --layout`: what the step-time model of dtrain/planner/layout.py needs,
# measured on simulated hosts (dtrain/netns.py) by the code paths training uses.
LAYOUT_PRESET = "small"  # the reference model: examples/train_gpt.py's GPT (vocab 256)
LAYOUT_SEQS = (1, 2, 4)  # sequences of block_size tokens per rank for the compute fit
LAYOUT_TRAIN_SEQS = (1, 2)  # per rank, for the compute-scale and overlap fit (hierarchical.py: 4 or 8 over 4)


def gpt_shape(preset: Any = LAYOUT_PRESET, vocab: int = 256) -> Any:
    """The planner's :class:`~dtrain.planner.shapes.ModelShape` of ``GPTConfig.preset(preset)``
    (or of ``preset`` itself when it is a ``GPTConfig``)."""
    from dtrain.models import GPTConfig
    from dtrain.planner.shapes import ModelShape

    cfg = preset if isinstance(preset, GPTConfig) else GPTConfig.preset(preset, vocab_size=vocab)
    name = f"gpt-{preset}" if isinstance(preset, str) else f"gpt-{cfg.n_layer}x{cfg.n_embd}"
    return ModelShape(name, layers=cfg.n_layer, hidden=cfg.n_embd, heads=cfg.n_head,
                      vocab=cfg.vocab_size, ffn=4 * cfg.n_embd, tied_embeddings=True)


LAYOUT_FIT_PRESETS = ("hpz", "hsdp")  # timed beside flat ZeRO-3 for the compute-scale and overlap fit


def _layout_worker(out: str, msg_bytes: list[int], repeats: int, steps: int, model_kwargs: dict | None = None) -> None:
    """One rank: (1) plain fwd+bwd+AdamW of the reference GPT at several batch sizes, every rank
    at once; (2) ``Comm`` all-gathers, reduce-scatters and all-reduces inside a node, across the
    whole world and across the node peers (the groups the zero layout uses); (3) training steps of
    the reference model under flat ZeRO-3 and ``LAYOUT_FIT_PRESETS``. Rank 0 writes the medians
    (slowest rank) as JSON."""
    import copy
    import json
    import statistics

    import torch

    import dtrain
    from dtrain.models import GPT, GPTConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = GPTConfig(**model_kwargs) if model_kwargs else GPTConfig.preset(LAYOUT_PRESET, vocab_size=256)
    model = GPT(cfg)
    initial = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    engine = dtrain.wrap(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4), config={"zero": {"stage": 3}})
    comm = engine.comm

    def timed(fn: Any) -> float:
        fn()
        runs = []
        for _ in range(repeats):
            comm.barrier()
            t0 = time.perf_counter()
            fn()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            comm.all_reduce(dt, op=torch.distributed.ReduceOp.MAX)
            runs.append(float(dt))
        return statistics.median(runs)

    def batch(seqs: int, step: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(1000 * step + comm.rank)
        ids = torch.randint(0, cfg.vocab_size, (seqs, cfg.block_size + 1), generator=g)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    result: dict[str, Any] = {"compute": {}, "collectives": [], "zero3_step_s": None}
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    for seqs in LAYOUT_SEQS:
        b = batch(seqs, 0)

        def plain_step() -> None:
            opt.zero_grad(set_to_none=True)
            plain(b["input_ids"], labels=b["labels"]).backward()
            opt.step()

        result["compute"][seqs] = timed(plain_step)
    result["optim_s"] = timed(opt.step)  # the full model's optimizer step alone (its gradients are set)
    for level, peers in (("node", False), ("global", False), ("node", True)):
        n = comm.size(level, peers)
        if n == 1:
            continue
        name = comm.topology.shape.level_of_ranks(comm.group_ranks(level, peers))
        for nbytes in msg_bytes:
            full = torch.zeros(nbytes // 4)
            part = torch.zeros(nbytes // 4 // n)
            for op, fn, sent in (
                ("all_gather", lambda: comm.all_gather(full, part, level, peers=peers), (n - 1) * nbytes // n),
                ("reduce_scatter", lambda: comm.reduce_scatter(part, full, level, peers=peers), (n - 1) * nbytes // n),
                ("all_reduce", lambda: comm.all_reduce(full, level, peers=peers), 2 * (n - 1) * nbytes // n),
            ):
                result["collectives"].append({"level": name, "group": n, "peers": peers, "op": op,
                                              "bytes_sent": sent, "s": timed(fn)})
    def training_step_s(trainer: Any, seqs: int) -> float:
        times = []
        for step in range(steps):
            b = batch(seqs, step)
            comm.barrier()
            t0 = time.perf_counter()
            trainer.train_step(b)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])

    result["steps_s"] = {f"zero3@{seqs}": training_step_s(engine, seqs) for seqs in LAYOUT_TRAIN_SEQS}
    result["zero3_step_s"] = result["steps_s"][f"zero3@{LAYOUT_TRAIN_SEQS[-1]}"]
    result["units"] = [u.padded for u in engine.layout.units] if hasattr(engine.layout, "units") else None
    for preset in LAYOUT_FIT_PRESETS:
        other = dtrain.wrap(copy.deepcopy(initial), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
                            config={"zero": {"preset": preset}})
        for seqs in LAYOUT_TRAIN_SEQS:
            result["steps_s"][f"{preset}@{seqs}"] = training_step_s(other, seqs)
        other.close()
    if comm.rank == 0:
        Path(out).write_text(json.dumps(result))
    engine.close()


def calibrate_layout(out_path: str | Path, *, nodes: int = 2, nproc: int = 2, net: str = "bw=1gbit",
                     quick: bool = False, timeout_s: float = 900, model: Any = None) -> dict[str, Any]:
    """Measure per-level bandwidth and latency, the compute rate and the overlap on ``nodes``
    namespaced hosts of ``nproc`` ranks joined by a ``net`` link, and write a cluster TOML.

    Fits (least squares of the relative residual, as the sequence-parallel calibration above):
    per level, ``t = latency + bytes_sent / bandwidth`` over the three collectives and the message
    sizes; ``t = step_overhead_s + flops / rate`` over the plain training steps; then the overlap
    ``phi`` from the flat ZeRO-3 steps: ``t = c + m - phi * h`` with ``c``, ``m`` and ``h`` (what
    full overlap would hide, forward and backward phase by phase) predicted by the fitted model
    (clipped to [0, 1]). Returns the report as a dict."""
    import json

    from dtrain import netns
    from dtrain.hierarchy import resolve_levels
    from dtrain.planner.layout import StepModel, predict
    from dtrain.topology import Shape

    if nodes < 2 or nproc < 2:
        raise PlannerError(f"--layout needs at least 2 nodes of 2 ranks (got --nodes {nodes} --nproc {nproc}) "
                           "to measure both an intra-node and an inter-node level")
    try:
        spec = netns.parse_net_spec(net)
    except ValueError as exc:
        raise PlannerError(str(exc)) from None
    reason = netns.unavailable_reason()
    if reason:
        raise PlannerError(f"--layout needs the slow-link harness (dtrain/netns.py): {reason}")
    t_start = time.perf_counter()
    msg_bytes = [1 << 16, 1 << 20, 1 << 22] if quick else [1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24]
    repeats, steps = (3, 5) if quick else (5, 8)
    with tempfile.TemporaryDirectory() as tmp:
        res_path = os.path.join(tmp, "layout.json")
        model_kwargs = None if model is None else {
            "vocab_size": model.vocab, "n_layer": model.layers, "n_head": model.heads, "n_embd": model.hidden,
            "block_size": _block_size()}
        argv = ["-m", "dtrain.planner.calibrate", "--layout-worker", res_path, json.dumps(msg_bytes),
                str(repeats), str(steps), json.dumps(model_kwargs)]
        with netns.create_hosts(nodes, spec["rate"], burst=spec.get("burst"), latency=spec.get("latency", "50ms"),
                                prefix="dtrain-cal") as hosts:
            codes = netns.wait_all(netns.spawn_ranks(hosts, nproc, argv, port=29480), timeout_s=timeout_s)
        if codes != [0] * (nodes * nproc):
            raise PlannerError(f"layout calibration ranks exited with {codes}")
        run = json.loads(Path(res_path).read_text())
    # per-level bandwidth and latency
    fits: dict[str, tuple[float, float]] = {}
    fit_errors: dict[str, float] = {}
    def key(c: dict) -> str:  # peer groups are fitted apart: a node's ranks share its link there
        return c["level"] + ("/peers" if c["peers"] else "")

    for level in sorted({key(c) for c in run["collectives"]}):
        pts = [c for c in run["collectives"] if key(c) == level]
        x = np.asarray([c["bytes_sent"] for c in pts], dtype=np.float64)
        y = np.asarray([c["s"] for c in pts], dtype=np.float64)
        inv_bw, lat = _fit(x, y)
        fits[level] = (1.0 / inv_bw, lat)
        fit_errors[level.replace("/", "_")] = float(np.max(np.abs((lat + x * inv_bw - y) / y)))
    intra_bw, intra_lat = fits.get("node", next(iter(fits.values())))
    inter_bw, inter_lat = fits.get("global", (intra_bw, intra_lat))
    # compute: t = overhead + flops / rate
    shape_model = model if model is not None else gpt_shape()
    tokens = {int(k): int(k) * _block_size() for k in run["compute"]}
    flops = np.asarray([tokens[int(k)] * shape_model.dense_flops_per_token for k in run["compute"]])
    inv_rate, overhead = _fit(flops, np.asarray(list(run["compute"].values()), dtype=np.float64))
    rate = 1.0 / inv_rate
    base = ClusterSpec(name=f"netns_{spec['rate']}", num_devices=nodes * nproc, devices_per_node=nproc,
                       linear_TFLOPS=rate / 1e12, intra_node_GBps=intra_bw / 1e9, inter_node_GBps=inter_bw / 1e9,
                       intra_node_latency_us=intra_lat * 1e6, inter_node_latency_us=inter_lat * 1e6,
                       bytes_per_element=4, memory_GiB=round((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
                                                             / 1024**3 / (nodes * nproc), 2), reserve_GiB=0.5)
    peer_fits = {f"{'intra' if k.split('/')[0] == 'node' else 'inter'}_node_peers": v
                 for k, v in fits.items() if k.endswith("/peers")}
    peer_figures = {f"{name}_{unit}": value for name, (bw, lat) in peer_fits.items()
                    for unit, value in (("GBps", bw / 1e9), ("latency_us", lat * 1e6))}
    # the plain steps' fixed part holds a full-model optimizer step: priced per element instead
    optim_full = float(run.get("optim_s", 0.0))
    optim_pp = optim_full / max(sum(run["units"]), 1)
    overhead = max(0.0, overhead - optim_full)
    base = replace(base, calibration={**peer_figures, "optim_s_per_param": optim_pp})
    # compute scale and overlap, from the training steps of flat ZeRO-3, hpZ and HSDP
    shape = Shape.of(nodes * nproc, 0, nodes)
    units = run["units"]
    tokens_per_rank = LAYOUT_TRAIN_SEQS[-1] * _block_size()
    optimizer = StepModel(rate, overhead, optim_s_per_param=optim_pp)
    assignments = []
    for key, measured in run["steps_s"].items():
        name, _, seqs = key.partition("@")
        zcfg = {"stage": 3, "preset": None} if name == "zero3" else {"stage": 0, "preset": name}
        levels = resolve_levels(SimpleNamespace(params=None, grads=None, optim=None, backward_params=None, **zcfg),
                                shape)
        assignments.append(FitSample(f"{name}_{seqs}seq", predict(units, levels, shape, base)[1], measured,
                                     optimizer.optim_s(units, levels),
                                     int(seqs) * _block_size()))
    scale, phi, fit = fit_step_model(rate, overhead, shape_model.dense_flops_per_token, tokens_per_rank, assignments)
    calibration = {"method": "dtrain plan calibrate --layout", "net": net, "nodes": nodes, "nproc": nproc,
                   "reference_model": (f"GPT preset {LAYOUT_PRESET!r}, vocab 256" if model is None else
                                       f"GPT {shape_model.name}"), "step_overhead_s": overhead,
                   "plain_compute_GFLOPS": rate / 1e9, "compute_scale": scale, "comm_overlap": phi,
                   "optim_s_per_param": optim_pp, "optim_full_model_s": optim_full,
                   **peer_figures,
                   **{f"{name}_{k}": v for name, row in fit.items() for k, v in row.items()},
                   **{f"fit_max_rel_error_{k}": round(v, 4) for k, v in fit_errors.items()}}
    base = replace(base, linear_TFLOPS=rate / scale / 1e12)
    cluster = replace(base, description=f"measured by `dtrain plan calibrate --layout --nodes {nodes} --nproc {nproc} "
                      f"--net {net}` (gloo over dtrain/netns.py hosts)", calibration=calibration)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(cluster.to_toml())
    report = {"out_path": str(out_path), "seconds": time.perf_counter() - t_start,
              "levels": {k: {"GBps": v[0] / 1e9, "latency_us": v[1] * 1e6} for k, v in fits.items()},
              "compute_GFLOPS": rate / scale / 1e9, **calibration, "raw": run}
    return report


def layout_summary(report: dict[str, Any]) -> str:
    lines = [f"calibrated zero levels in {report['seconds']:.0f} s ({report['net']}, {report['nodes']} x "
             f"{report['nproc']}); wrote {report['out_path']}"]
    for level, v in report["levels"].items():
        lines.append(f"  {level:>7}: {v['GBps'] * 1e3:8.1f} MB/s, latency {v['latency_us']:7.0f} us "
                     f"(fit max error {100 * report['fit_max_rel_error_' + level.replace('/', '_')]:.0f}%)")
    lines.append(f"  compute: {report['compute_GFLOPS']:.2f} GFLOP/s per rank + {report['step_overhead_s'] * 1e3:.1f} "
                 f"ms per step")
    lines.append(f"  compute under training x{report['compute_scale']:.2f} of the plain steps' "
                 f"({report['plain_compute_GFLOPS']:.2f} GFLOP/s), overlap {report['comm_overlap']:.2f}")
    for name in (f"{p}_{n}seq" for p in ("zero3", *LAYOUT_FIT_PRESETS) for n in LAYOUT_TRAIN_SEQS):
        if f"{name}_measured_s" in report:
            lines.append(f"  {name:>10} step: measured {report[f'{name}_measured_s'] * 1e3:.0f} ms, predicted "
                         f"{report[f'{name}_predicted_s'] * 1e3:.0f} ms")
    return "\n".join(lines)


class FitSample(NamedTuple):
    """One measured training step for :func:`fit_step_model`."""

    name: str
    phase_comm: dict[str, float]  # predicted communication seconds by phase
    measured_s: float
    optim_s: float = 0.0  # the optimizer's exposed seconds (StepModel.optim_s)
    tokens_per_rank: float | None = None  # None: fit_step_model's default


def fit_step_model(rate: float, overhead: float, flops_per_token: float, tokens_per_rank: float,
                   assignments: Sequence[tuple]) -> tuple[float, float, dict]:
    """The compute scale ``k`` (training computes at ``rate / k``: on shared CPUs the traffic's own
    work slows the compute down) and the overlap ``phi`` that make the step model of
    dtrain/planner/layout.py best fit the measured steps ``assignments`` (:class:`FitSample`, or
    tuples in its field order): the least largest relative error over a grid of ``k`` in [0.5, 4]
    and ``phi`` in [0, 1]. Returns ``(k, phi, {name: measured, predicted})``."""
    from dtrain.planner.layout import StepModel

    samples = [FitSample(*a) for a in assignments]

    def predicted(model: Any, a: FitSample) -> float:
        tokens = tokens_per_rank if a.tokens_per_rank is None else a.tokens_per_rank
        return model.step_s(model.compute_s(flops_per_token, tokens), a.phase_comm) + a.optim_s

    best: tuple[float, float, float] | None = None
    for k in np.arange(0.5, 4.0001, 0.01):
        for phi in np.arange(0.0, 1.0001, 0.01):
            model = StepModel(rate / k, overhead, float(phi))
            worst = max(abs(predicted(model, a) / a.measured_s - 1) for a in samples)
            if best is None or worst < best[0] - 1e-12:
                best = (worst, float(k), float(phi))
    _, k, phi = best
    model = StepModel(rate / k, overhead, phi)
    fit = {a.name: {"measured_s": a.measured_s, "predicted_s": predicted(model, a)} for a in samples}
    return round(k, 2), round(phi, 2), fit


def _block_size() -> int:
    from dtrain.models import GPTConfig

    return GPTConfig.preset(LAYOUT_PRESET, vocab_size=256).block_size


if __name__ == "__main__":  # a rank of `calibrate_layout` (spawned inside a namespace)
    import json
    import sys

    if sys.argv[1:2] == ["--layout-worker"]:
        _layout_worker(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                       json.loads(sys.argv[6]) if len(sys.argv) > 6 else None)
