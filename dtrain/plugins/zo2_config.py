"""The ``zo2`` plugin's config section (torch-free, so the launcher can validate it before any rank
starts). :class:`dtrain.plugins.zo2.ZO2Plugin` declares it as its nested ``Config``; the method
and its RNG contract are in docs/zo2.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dtrain.config import register_section, require


@dataclass(kw_only=True)
class ZO2Config:
    """Zeroth-order fine-tuning (MeZO-SGD) with optional block streaming (ZO2)."""

    enabled: bool = False
    lr: float = 1e-6
    """Learning rate of the update theta <- theta - lr * (g * z + wd * theta). A scheduler passed to
    dtrain.wrap drives it (it steps a placeholder optimizer whose lr starts here)."""
    eps: float = 1e-3
    """Perturbation scale epsilon: the two forwards see theta + eps z and theta - eps z."""
    weight_decay: float = 0.0
    """wd of the update; applied to parameters with >= 2 dimensions only (never to biases or norm weights)."""
    seed: int = 0
    """The step seed is seed * 1_000_003 + step (docs/zo2.md: the RNG contract)."""
    stream: Literal["off", "host", "nvme"] = "off"
    """Where the transformer blocks live between uses: on the device (off), in host memory (host) or
    in an aligned file (nvme, under nvme_dir); embeddings and head stay on the device."""
    prefetch_blocks: int = 1
    """Blocks prepared ahead (uploaded, updated, perturbed) by a background thread while the current
    block computes; 0 prepares each block on the compute thread when it is needed."""
    blocks: str | None = None
    """Dotted path of the nn.ModuleList of blocks to stream (e.g. "transformer.h"); default: the
    largest ModuleList of identically-typed modules."""
    nvme_dir: str | None = None
    """Directory of the block file for stream = "nvme" (default: the system temporary directory)."""

    def validate(self) -> None:
        require(self.lr > 0, "zo2.lr", self.lr, "a positive float")
        require(self.eps > 0, "zo2.eps", self.eps, "a positive float (the perturbation scale, e.g. 1e-3)")
        require(self.weight_decay >= 0, "zo2.weight_decay", self.weight_decay, "a float >= 0")
        require(0 <= self.seed < 2**40, "zo2.seed", self.seed, "an integer in [0, 2**40)")
        require(self.prefetch_blocks >= 0, "zo2.prefetch_blocks", self.prefetch_blocks, "an integer >= 0")


register_section("zo2", ZO2Config)
