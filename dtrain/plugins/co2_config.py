"""The ``co2`` plugin's config section (torch-free, so the launcher can validate it before any rank
starts). :class:`dtrain.plugins.co2.CO2Plugin` declares it as its nested ``Config``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dtrain.config import ConfigError, register_section, require


@dataclass(kw_only=True)
class CO2Config:
    """CO2 (Sun et al., ICLR 2024): local steps + an outer all-reduce overlapped with the next round."""

    enabled: bool = False
    local_steps: int = 4
    """tau: inner (local) optimizer steps per round; the outer sync starts every tau steps."""
    outer_lr: float = 1.0
    """alpha: outer learning rate applied to the outer momentum."""
    outer_momentum: float = 0.5
    """beta: outer momentum decay (0 disables outer momentum)."""
    clip: float | None = None
    """phi: clip the outer momentum element-wise to [-phi, phi]; None disables clipping."""
    penalty: float | Literal["off", "adaptive"] = field(
        default="adaptive", metadata={"replaced": ((True, '"adaptive"'), (False, '"off"'))})
    """The pseudo-gradient's divisor Lambda (plugins/co2.py): "adaptive" = per tensor
    1 + ||Delta|| / ||x_outer|| (a reconstruction, not the paper's formula), a positive number =
    that constant (the authors' released code, ``co2_gap_penalty``), "off" = 1."""
    intra_node_sync: bool = True
    """Ranks of one node all-reduce gradients every step; False makes every rank its own worker."""
    overlap: bool = True
    """False = synchronous local SGD: the outer all-reduce is waited for and applied at once."""

    def validate(self) -> None:
        if self.enabled and self.local_steps < 1:
            raise ConfigError(f"co2.local_steps = {self.local_steps!r} is not allowed with co2.enabled = true; "
                              f"expected an integer >= 1 (the number of local steps per round)")
        require(self.local_steps >= 1, "co2.local_steps", self.local_steps, "an integer >= 1")
        require(self.outer_lr > 0, "co2.outer_lr", self.outer_lr, "a positive float")
        require(0 <= self.outer_momentum < 1, "co2.outer_momentum", self.outer_momentum, "a float in [0, 1)")
        require(self.clip is None or self.clip > 0, "co2.clip", self.clip,
                 "a positive float, or omit it to disable outer-momentum clipping")
        require(isinstance(self.penalty, str) or self.penalty > 0, "co2.penalty", self.penalty,
                '"adaptive", "off" or a positive number (a constant divisor of the pseudo-gradient)')


register_section("co2", CO2Config)
