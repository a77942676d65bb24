"""Small reference models used by the examples, tests and benchmarks."""
from dtrain.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
