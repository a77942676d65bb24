"""Calibrating the planner's cost model from the seqpar runtime's own timed steps.

`dtrain plan calibrate` fits the cost model on one transformer layer run per sequence; the runtime
packs a group's sequences into one forward and backward of the whole model, with one all-to-all
per layer and direction for the whole pack. This module fits the same equation
(``dtrain/planner/cost.py``) to what the runtime measured, plus the one term the planner's
equation used to lack, a fixed cost per group and micro-batch (now the cost model's ``c(d)``,
:meth:`CostModel.group_overhead`, which the planner's search prices):

    t_group(d, lengths) = c(d) + sum_i [ (alpha1 s_i^2 + alpha2 s_i) / d + beta1 + k(d) s_i ]

``c(d)`` is the runtime's fixed cost of one micro-batch on a group of ``d`` (the model's kernels
on a packed batch, the all-to-alls' latencies), ``k(d)`` its all-to-all seconds per token (0 for
``d = 1``). Samples are the seqpar plugin's per-group times (the slowest rank of the group,
forward + backward of one micro-batch: :meth:`SeqParPlugin.group_samples`), typically from steps
with static groups of every size. The fit is a non-negative least squares on relative residuals.

:func:`to_cluster` turns the fit into a cluster file the planner plans with (``alpha1``,
``alpha2``, ``beta1`` and ``v(d)`` as the cost model reads them; ``c(d)`` in its
``[calibration]`` table, which the cost model adds per group and micro-batch). ``dtrain plan calibrate
--seqpar SAMPLES.json`` fits a file of samples (benchmarks/seqpar.py writes one).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dtrain.planner.cluster import ClusterSpec
from dtrain.planner.cost import ALLTOALLS_PER_LAYER, GROUP_KEY, CostModel
from dtrain.planner.errors import PlannerError
from dtrain.planner.shapes import ModelShape


@dataclass(frozen=True)
class GroupSample:
    """One group's measured forward + backward of one micro-batch."""

    d: int
    lengths: tuple[int, ...]
    seconds: float


@dataclass
class RuntimeFit:
    alpha1: float
    alpha2: float
    beta1: float
    group_s: dict[int, float]
    per_token_s: dict[int, float]
    samples: int = 0
    max_rel_residual: float = 0.0
    median_rel_residual: float = 0.0
    residual_by_d: dict[int, float] = field(default_factory=dict)

    def group_time(self, d: int, lengths: Sequence[int]) -> float:
        s = np.asarray(lengths, dtype=np.float64)
        return float(self.group_s.get(d, 0.0) + ((self.alpha1 * s * s + self.alpha2 * s) / d).sum()
                     + self.beta1 * len(s) + self.per_token_s.get(d, 0.0) * s.sum())

    def to_dict(self) -> dict[str, Any]:
        return {"alpha1": self.alpha1, "alpha2": self.alpha2, "beta1": self.beta1,
                "group_s": self.group_s, "per_token_s": self.per_token_s, "samples": self.samples,
                "max_rel_residual": self.max_rel_residual, "median_rel_residual": self.median_rel_residual,
                "residual_by_d": self.residual_by_d}


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares (active set: drop the most negative coefficient and refit)."""
    free = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while free:
        sol = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
        if (sol >= 0).all():
            x[:] = 0.0
            x[free] = sol
            return x
        free.pop(int(np.argmin(sol)))
    return x


def fit(samples: Sequence[GroupSample]) -> RuntimeFit:
    """Fit the module docstring's equation to ``samples`` (relative residuals, coefficients >= 0)."""
    samples = [s for s in samples if s.lengths and s.seconds > 0]
    sizes = sorted({s.d for s in samples})
    multi = [d for d in sizes if d > 1]
    columns = ["alpha1", "alpha2", "beta1"] + [f"c{d}" for d in sizes] + [f"k{d}" for d in multi]
    thin = [d for d in sizes if sum(s.d == d for s in samples) < 2]
    if len(samples) <= len(columns) or thin:
        raise PlannerError(f"seqpar calibration: {len(samples)} group samples ({', '.join(f'd={d}: {sum(s.d == d for s in samples)}' for d in sizes)}) "
                           f"cannot fit {len(columns)} coefficients (at least 2 per group size); time more steps "
                           f"with static groups of each size")
    rows = []
    for s in samples:
        n = np.asarray(s.lengths, dtype=np.float64)
        row = [float((n * n).sum()) / s.d, float(n.sum()) / s.d, float(len(n))]
        row += [1.0 if s.d == d else 0.0 for d in sizes]
        row += [float(n.sum()) if s.d == d else 0.0 for d in multi]
        rows.append(row)
    a = np.asarray(rows)
    y = np.asarray([s.seconds for s in samples])
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    x = _nnls(a / scale / y[:, None], np.ones_like(y)) / scale
    coef = dict(zip(columns, x))
    result = RuntimeFit(alpha1=coef["alpha1"], alpha2=coef["alpha2"], beta1=coef["beta1"],
                        group_s={d: coef[f"c{d}"] for d in sizes}, per_token_s={d: coef[f"k{d}"] for d in multi},
                        samples=len(samples))
    rel = np.asarray([(result.group_time(s.d, s.lengths) - s.seconds) / s.seconds for s in samples])
    result.max_rel_residual = float(np.abs(rel).max())
    result.median_rel_residual = float(np.median(np.abs(rel)))
    result.residual_by_d = {d: float(np.median(np.abs(rel[[s.d == d for s in samples]]))) for d in sizes}
    return result


def to_cluster(result: RuntimeFit, shape: ModelShape, base: ClusterSpec) -> ClusterSpec:
    """``base`` with the cost model's coefficients replaced by the fit (CostModel reads them back)."""
    per_token_bytes = ALLTOALLS_PER_LAYER * shape.layers * shape.hidden * base.bytes_per_element
    bandwidth = {d: per_token_bytes * (d - 1) / (d * d) / k / 1e9 for d, k in result.per_token_s.items() if k > 0}
    tiny = 1e-12  # a coefficient fitted to 0 is "free", which the cluster file cannot say literally
    fastest = max(bandwidth.values(), default=1e3)
    return replace(
        base, name=f"{base.name}+seqpar", description=f"{base.description}; compute and all-to-all refitted "
        f"from {result.samples} timed seqpar groups (dtrain.seqpar.calibrate)",
        attention_TFLOPS=shape.attention_flops_per_token2 / max(result.alpha1, tiny) / 1e12,
        linear_TFLOPS=shape.dense_flops_per_token / max(result.alpha2, tiny) / 1e12,
        overhead_us_per_layer=result.beta1 / shape.layers * 1e6,
        intra_node_latency_us=0.0, inter_node_latency_us=0.0,
        intra_node_GBps=fastest, inter_node_GBps=fastest,
        alltoall_GBps={d: bandwidth.get(d, 1e3) for d in result.per_token_s},
        calibration={**base.calibration, **{GROUP_KEY.format(d): c for d, c in result.group_s.items()},
                     "seqpar_samples": result.samples,
                     "seqpar_max_rel_residual": round(result.max_rel_residual, 4),
                     "seqpar_median_rel_residual": round(result.median_rel_residual, 4)},
    )


def predict_step(cost: CostModel, micro_batches: Sequence[Sequence[tuple[int, Sequence[int]]]]) -> float:
    """Modeled forward + backward seconds of a plan: per micro-batch its slowest group, where a
    group of ``d`` running ``lengths`` costs ``c(d) + sum seq_time(s, d)``.

    ``micro_batches``: per micro-batch, ``(d, lengths)`` of each group."""
    total = 0.0
    for groups in micro_batches:
        total += max((cost.group_time(list(lengths), d) for d, lengths in groups), default=0.0)
    return total


def load_samples(path: str | Path) -> list[GroupSample]:
    """Samples from a JSON list of ``{"d": .., "lengths": [..], "seconds": ..}`` (or ``{"samples": [...]}``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlannerError(f"cannot read seqpar samples {str(path)!r}: {exc}; pass the JSON file "
                           f"benchmarks/seqpar.py writes (--samples)") from None
    rows = data["samples"] if isinstance(data, dict) and "samples" in data else data
    try:
        return [GroupSample(int(r["d"]), tuple(int(n) for n in r["lengths"]), float(r["seconds"])) for r in rows]
    except (TypeError, KeyError, ValueError) as exc:
        raise PlannerError(f"seqpar samples {str(path)!r}: each entry needs d, lengths and seconds ({exc})") from None
