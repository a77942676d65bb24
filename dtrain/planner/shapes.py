"""Transformer model shapes for the planner: presets, ``key=value`` parsing, FLOP and byte counts.

A shape is what the cost model needs from a model: layer count ``L``, hidden size ``h``,
attention heads, vocabulary ``V``, MLP width ``f`` and whether the MLP is gated (SwiGLU:
three ``h x f`` matrices instead of two).

Counts used by :mod:`dtrain.planner.cost` (training = forward + backward = 3x forward FLOPs):

* parameters per layer          ``P_layer = 4 h^2 + m h f``   (m = 3 gated, 2 plain)
* total parameters              ``P = L P_layer + V h (1 if tied else 2)``
* dense FLOPs per token         ``6 (L P_layer + V h)``       (LM head counted once)
* attention FLOPs per sequence  ``6 h L s^2``                 (QK^T and AV, 2 s^2 h each
  forward, halved by the causal mask, times 3 for training)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dtrain.planner.errors import PlannerError


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer (see module docstring for the counts)."""

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    ffn: int
    gated_mlp: bool = False
    tied_embeddings: bool = False

    @property
    def params_per_layer(self) -> int:
        mats = 3 if self.gated_mlp else 2
        return 4 * self.hidden * self.hidden + mats * self.hidden * self.ffn

    @property
    def num_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.params_per_layer + embed

    @property
    def dense_flops_per_token(self) -> float:
        """Training FLOPs of all matmuls for one token (``6 (L P_layer + V h)``)."""
        return 6.0 * (self.layers * self.params_per_layer + self.vocab * self.hidden)

    @property
    def attention_flops_per_token2(self) -> float:
        """Training FLOPs of causal attention per squared token (``6 h L``)."""
        return 6.0 * self.hidden * self.layers

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


PRESETS: dict[str, ModelShape] = {
    # LLaMA-2 7B / 13B shapes (SwiGLU MLP, untied embeddings).
    "7b": ModelShape("7b", layers=32, hidden=4096, heads=32, vocab=32000, ffn=11008, gated_mlp=True),
    "13b": ModelShape(
        "13b", layers=40, hidden=5120, heads=40, vocab=32000, ffn=13824, gated_mlp=True
    ),
    # dtrain.models.GPTConfig.preset("bench") (tied embeddings, GELU MLP of width 4h).
    "gpt-bench": ModelShape(
        "gpt-bench", layers=6, hidden=576, heads=8, vocab=8192, ffn=4 * 576, tied_embeddings=True
    ),
}

_INT_KEYS = ("layers", "hidden", "heads", "vocab", "ffn")
_BOOL_KEYS = ("gated", "tied")


def parse_model(spec: str) -> ModelShape:
    """Parse a preset name (``7b``, ``13b``, ``gpt-bench``) or ``layers=..,hidden=..,heads=..,vocab=..``.

    Optional keys: ``ffn`` (default ``4*hidden``), ``gated`` and ``tied`` (``0``/``1``).
    Raises :class:`PlannerError` naming the bad part and the accepted forms.
    """
    text = spec.strip().lower()
    if text in PRESETS:
        return PRESETS[text]
    usage = (
        f"use a preset ({', '.join(sorted(PRESETS))}) or "
        "'layers=32,hidden=4096,heads=32,vocab=32000' (optional ffn=, gated=0|1, tied=0|1)"
    )
    if "=" not in text:
        raise PlannerError(f"unknown model {spec!r}; {usage}")
    fields: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _INT_KEYS + _BOOL_KEYS:
            raise PlannerError(f"bad model field {part!r} in {spec!r}; {usage}")
        if key in fields:
            raise PlannerError(f"model field {key!r} given twice in {spec!r}; {usage}")
        try:
            fields[key] = int(value)
        except ValueError:
            raise PlannerError(f"model field {key}={value!r} is not an integer; {usage}") from None
        if key in _INT_KEYS and fields[key] <= 0:
            raise PlannerError(f"model field {key}={value} must be positive; {usage}")
    missing = [k for k in ("layers", "hidden", "heads", "vocab") if k not in fields]
    if missing:
        raise PlannerError(f"model {spec!r} lacks {', '.join(missing)}; {usage}")
    if fields["hidden"] % fields["heads"]:
        raise PlannerError(
            f"model hidden={fields['hidden']} is not divisible by heads={fields['heads']}; "
            "pick a head count that divides the hidden size"
        )
    return ModelShape(
        name=spec.strip(),
        layers=fields["layers"],
        hidden=fields["hidden"],
        heads=fields["heads"],
        vocab=fields["vocab"],
        ffn=fields.get("ffn", 4 * fields["hidden"]),
        gated_mlp=bool(fields.get("gated", 0)),
        tied_embeddings=bool(fields.get("tied", 0)),
    )
