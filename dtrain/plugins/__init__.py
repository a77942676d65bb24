"""Runtime plugins. Importing this package registers every built-in plugin by name."""
from dtrain.plugins import zero  # noqa: F401  (registers ddp, zero1, zero2, zero3)
