"""The ``seqpar`` plugin's config section (torch-free, so the launcher validates it before any rank
starts). :class:`dtrain.seqpar.plugin.SeqParPlugin` declares it as its nested ``Config``."""
from __future__ import annotations

from dataclasses import dataclass

from dtrain.config import register_section, require


@dataclass(kw_only=True)
class SeqParConfig:
    """FlexSP runtime: each step runs the planner's plan, with sequence-parallel groups of
    different sizes (docs/seqpar.md)."""

    enabled: bool = False
    max_tokens_per_rank: int | None = None
    """Tokens one rank may hold in a micro-batch (the planner's memory limit); None: the cluster
    file's memory model decides."""
    solver_time_s: float = 1.0
    """The planner's time limit per step."""
    solver: str = "highs"
    """The planner's per-micro-batch solver (``PlannerOptions.solver``): ``highs`` (the MILP and its
    bound, within ``solver_time_s``), ``cbc``, or ``greedy`` (its heuristics only: about a third of
    the CPU, for hosts where the solve shares the cores that train; docs/seqpar.md)."""
    cluster: str | None = None
    """Cluster TOML for the cost model; None: this machine's calibrated ``cluster/cpu_local.toml``
    (``dtrain plan calibrate``), else the planner's default cluster."""
    lookahead: int = 1
    """1: rank 0 solves step i+1 in a background thread while step i trains (needs the next
    batch's lengths: ``dtrain.seqpar.ahead`` or ``SeqBatch.next_lengths``); 0: solve in the step."""
    model: str | None = None
    """The planner's model shape (``dtrain plan seqpar --model`` syntax); None: read from the model."""

    def validate(self) -> None:
        require(self.max_tokens_per_rank is None or self.max_tokens_per_rank >= 1, "seqpar.max_tokens_per_rank",
                self.max_tokens_per_rank, "a positive integer, or omit it to use the cluster's memory model")
        require(self.solver_time_s > 0, "seqpar.solver_time_s", self.solver_time_s, "a positive number of seconds")
        require(self.solver in ("highs", "cbc", "greedy"), "seqpar.solver", self.solver, "highs, cbc or greedy")
        require(self.lookahead in (0, 1), "seqpar.lookahead", self.lookahead, "0 or 1")


register_section("seqpar", SeqParConfig)
