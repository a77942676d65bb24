"""Cost model of one training pass of a sequence under Ulysses-style sequence parallelism.

For a sequence of ``s`` tokens processed by an SP group of ``d`` devices (model shape from
:mod:`dtrain.planner.shapes`, hardware from :mod:`dtrain.planner.cluster`):

Compute (per device; attention is split by heads, the dense layers by tokens)::

    t_comp(s, d) = (alpha1 s^2 + alpha2 s) / d + beta1
    alpha1 = 6 h L / F_attn          alpha2 = 6 (L P_layer + V h) / F_lin
    beta1  = L * overhead_per_layer

All-to-all (Ulysses: 4 all-to-alls per layer forward -- q, k, v in, output back -- and 4 in
backward; each device holds ``s/d`` tokens of ``h`` elements and sends ``(d-1)/d`` of them)::

    t_comm(s, d) = 8 L ( lat(d) + s h b (d-1) / d^2 / v(d) )      (0 when d = 1)

Time of a sequence: ``t(s, d) = t_comp(s, d) + t_comm(s, d)`` (no compute/comm overlap: a
conservative assumption). Sequences assigned to one group run one after another, so a
group's load is the sum of its sequences' times plus a fixed cost per group and micro-batch::

    t_group(d, S) = c(d) + sum_{s in S} t(s, d)

``c(d)`` is what one micro-batch costs a group of ``d`` whatever it holds: a runtime that packs
the group's sequences into one forward and backward pays the model's kernel launches and, for
``d > 1``, the all-to-alls' latencies once per micro-batch (measured on the seqpar runtime:
docs/seqpar.md). It is 0 unless the cluster file's ``[calibration]`` table has
``seqpar_group_s_d<d>`` (written by :mod:`dtrain.seqpar.calibrate`), so the planner's plans
on the shipped cluster files do not change; with it, the split into micro-batches trades the
extra ``c(d)`` of one more micro-batch against what that micro-batch saves.

Memory per device: model states are ZeRO-3-sharded over all ``N`` devices, plus a buffer
for two gathered layers; activations are proportional to the tokens a device holds::

    M_states = P * state_bytes_per_param / N + 2 * 2 * P_layer
    a_tok    = act_bytes * h * L + logit_bytes * V          (bytes per token)
    per-device memory of a group = M_states + a_tok * sum(s) / d  <=  M_dev - reserve

The smallest power-of-two ``d`` with ``a_tok * s / d <= M_avail`` is the sequence's minimum
SP size. Group sizes are the powers of two ``<= N`` that divide the head count ``H``
(:attr:`CostModel.group_sizes`; Ulysses gives each device ``H / d`` whole heads), so a
sequence longer than ``max_group_size * tokens_per_device`` cannot be planned. Assumptions: homogeneous devices, no GQA (k, v as wide as q), gradient reduction and
optimizer step not modelled (identical for every plan of the same batch).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dtrain.planner.cluster import GIB, ClusterSpec
from dtrain.planner.errors import PlannerError
from dtrain.planner.shapes import ModelShape

ALLTOALLS_PER_LAYER = 8
GROUP_KEY = "seqpar_group_s_d{}"
"""``[calibration]`` key of ``c(d)``, the fixed seconds of one group of ``d`` per micro-batch."""


def power_of_two_sizes(limit: int) -> list[int]:
    """``[1, 2, 4, ...]`` up to and including the largest power of two ``<= limit``."""
    sizes, d = [], 1
    while d <= limit:
        sizes.append(d)
        d *= 2
    return sizes


@dataclass(frozen=True)
class CostModel:
    """Evaluates the equations of the module docstring for one model on one cluster."""

    model: ModelShape
    cluster: ClusterSpec

    # -------------------------------------------------------------- coefficients
    @cached_property
    def alpha1(self) -> float:
        """Seconds per squared token (attention) on one device."""
        return self.model.attention_flops_per_token2 / (self.cluster.attention_TFLOPS * 1e12)

    @cached_property
    def alpha2(self) -> float:
        """Seconds per token (dense layers) on one device."""
        return self.model.dense_flops_per_token / (self.cluster.linear_TFLOPS * 1e12)

    @cached_property
    def beta1(self) -> float:
        """Fixed seconds per sequence (kernel launches, per-layer bookkeeping)."""
        return self.model.layers * self.cluster.overhead_us_per_layer * 1e-6

    @cached_property
    def bytes_per_token(self) -> float:
        """Activation bytes per token held by a device (``a_tok``)."""
        c, m = self.cluster, self.model
        return (
            c.activation_bytes_per_token_layer_hidden * m.hidden * m.layers
            + c.logit_bytes_per_token_vocab * m.vocab
        )

    @cached_property
    def model_state_bytes(self) -> float:
        """Per-device bytes of sharded model states plus the gathered-layer buffer."""
        m = self.model
        sharded = m.num_params * self.cluster.state_bytes_per_param / self.cluster.num_devices
        return sharded + 2 * 2 * m.params_per_layer

    @cached_property
    def activation_budget(self) -> float:
        """``M_avail``: per-device bytes left for activations (may be <= 0: nothing fits)."""
        c = self.cluster
        return (c.memory_GiB - c.reserve_GiB) * GIB - self.model_state_bytes

    @cached_property
    def tokens_per_device(self) -> float:
        """How many tokens of activations one device can hold."""
        return self.activation_budget / self.bytes_per_token

    @cached_property
    def group_sizes(self) -> list[int]:
        """SP group sizes the planner may use: powers of two ``<= N`` that divide the model's
        head count (Ulysses scatters whole heads over the group's devices)."""
        return [d for d in power_of_two_sizes(self.cluster.num_devices) if self.model.heads % d == 0]

    @property
    def max_group_size(self) -> int:
        """The largest size in :attr:`group_sizes`."""
        return self.group_sizes[-1]

    # --------------------------------------------------------------------- times
    def compute_time(self, s: float, d: int) -> float:
        return (self.alpha1 * s * s + self.alpha2 * s) / d + self.beta1

    def _comm_coefficients(self, d: int) -> tuple[float, float]:
        """``(fixed, per_token)`` seconds of all-to-all for one sequence on ``d`` devices."""
        cache = self.__dict__.setdefault("_comm_cache", {})
        if d not in cache:
            if d <= 1:
                cache[d] = (0.0, 0.0)
            else:
                c, k = self.cluster, ALLTOALLS_PER_LAYER * self.model.layers
                per_token = self.model.hidden * c.bytes_per_element * (d - 1) / (d * d)
                cache[d] = (k * c.alltoall_latency(d), k * per_token / c.alltoall_bandwidth(d))
        return cache[d]

    def group_overhead(self, d: int) -> float:
        """``c(d)``: fixed seconds of one group of ``d`` devices per micro-batch (module docstring)."""
        cache = self.__dict__.setdefault("_group_cache", {})
        if d not in cache:
            cache[d] = float(self.cluster.calibration.get(GROUP_KEY.format(d), 0.0))
        return cache[d]

    def group_time(self, lengths: "np.ndarray | list[int]", d: int) -> float:
        """``t_group(d, S)``: ``c(d)`` plus the group's sequences one after another."""
        return self.group_overhead(d) + float(self.seq_times(lengths, d).sum())

    def comm_time(self, s: float, d: int) -> float:
        fixed, per_token = self._comm_coefficients(d)
        return fixed + per_token * s if d > 1 else 0.0

    def seq_time(self, s: float, d: int) -> float:
        """``t(s, d)``: seconds for one sequence on a group of ``d`` devices."""
        return self.compute_time(s, d) + self.comm_time(s, d)

    def seq_times(self, lengths: "np.ndarray | list[int]", d: int) -> np.ndarray:
        """Vectorised :meth:`seq_time` over many lengths."""
        s = np.asarray(lengths, dtype=np.float64)
        fixed, per_token = self._comm_coefficients(d)
        comm = fixed + per_token * s if d > 1 else 0.0
        return (self.alpha1 * s * s + self.alpha2 * s) / d + self.beta1 + comm

    def work(self, s: float, d: int) -> float:
        """Device-seconds of compute only (``d * t_comp``): used by the ideal lower bound."""
        return d * self.compute_time(s, d)

    # -------------------------------------------------------------------- memory
    def activation_bytes(self, s: float, d: int) -> float:
        """Per-device activation bytes of one sequence on ``d`` devices."""
        return self.bytes_per_token * s / d

    def fits(self, total_tokens: float, d: int) -> bool:
        """Whether a group of ``d`` devices can hold ``total_tokens`` at once."""
        return self.bytes_per_token * total_tokens <= d * self.activation_budget * (1 + 1e-12)

    def min_degree(self, s: int) -> int | None:
        """Smallest group size (of :attr:`group_sizes`) that holds ``s`` tokens, or None if none does."""
        budget = self.activation_budget
        if budget <= 0:
            return None
        need = self.bytes_per_token * s / budget
        d = 1 << max(0, math.ceil(math.log2(need))) if need > 1 else 1
        while d > 1 and self.fits(s, d // 2):
            d //= 2
        while not self.fits(s, d):
            d *= 2
        return d if d <= self.max_group_size else None

    def check_batch(self, lengths: list[int]) -> list[int]:
        """Minimum SP size of every sequence; raises PlannerError naming unplannable input."""
        if len(lengths) == 0:
            raise PlannerError(
                "the batch is empty; pass at least one sequence length (--lengths FILE with one "
                "integer per line, or --dist NAME --batch B)"
            )
        bad = [(i, s) for i, s in enumerate(lengths) if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0]
        if bad:
            i, s = bad[0]
            raise PlannerError(
                f"sequence {i} has length {s!r}; lengths must be positive integers"
            )
        if self.activation_budget <= 0:
            raise PlannerError(
                f"model {self.model.name!r} states need {self.model_state_bytes / GIB:.1f} GiB per "
                f"device, more than the {self.cluster.memory_GiB - self.cluster.reserve_GiB:.1f} GiB "
                "available; use more devices or a smaller model"
            )
        degrees: list[int] = []
        cap = self.max_group_size
        largest = int(cap * self.tokens_per_device)
        for i, s in enumerate(lengths):
            d = self.min_degree(s)
            if d is None:
                why = (f"all {cap} devices" if cap == self.cluster.num_devices else
                       f"the largest group, {cap} devices (sizes must divide the model's "
                       f"{self.model.heads} heads and be powers of two <= {self.cluster.num_devices})")
                raise PlannerError(
                    f"sequence {i} of length {s} does not fit in memory even on {why}: at most "
                    f"{largest} tokens ({self.bytes_per_token / 1024**2:.2f} MiB of activations per "
                    f"token, {self.activation_budget / GIB:.1f} GiB per device); split the sequence, "
                    "use devices with more memory or activation checkpointing"
                )
            degrees.append(d)
        return degrees

    def comm_aware_lower_bound(self, lengths: list[int], degrees: list[int]) -> float:
        """A valid lower bound on any plan's step time ``S`` under this model, comm included.

        A sequence run by a group of ``d`` devices in some micro-batch finishes within that
        micro-batch, so ``t(s, d) <= S``; it then occupies at least
        ``w_i(S) = min {d t(s_i, d) : d >= delta_i, t(s_i, d) <= S}`` device-seconds, and the
        step offers ``N S`` of them: ``N S >= W(S) = sum_i w_i(S)``. ``W`` does not increase
        with ``S``, so the smallest ``S`` with ``N S >= W(S)`` (found by bisection) bounds
        every plan from below. It is at least the compute-only ideal bound.
        """
        n = self.cluster.num_devices
        s = np.asarray(lengths, dtype=np.float64)
        sizes = self.group_sizes
        times = np.stack([self.seq_times(s, d) for d in sizes], axis=1)
        allowed = np.asarray(degrees)[:, None] <= np.asarray(sizes)[None, :]
        times = np.where(allowed, times, np.inf)
        work = times * np.asarray(sizes, dtype=np.float64)[None, :]

        def total_work(limit: float) -> float:
            return float(np.where(times <= limit, work, np.inf).min(axis=1).sum())

        lo = float(times.min(axis=1).max())  # no plan beats its slowest sequence
        if n * lo >= total_work(lo):
            return lo
        hi = max(lo, total_work(lo) / n)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if n * mid >= total_work(mid):
                hi = mid
            else:
                lo = mid
        return hi

    def ideal_lower_bound(self, lengths: list[int], degrees: list[int]) -> float:
        """Total compute work (at each sequence's minimum SP size) spread over all N devices."""
        total = sum(self.work(s, d) for s, d in zip(lengths, degrees))
        return total / self.cluster.num_devices
