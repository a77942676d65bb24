"""Runtime plugins. Importing this package registers every built-in plugin by name."""
from dtrain.plugins import zero  # noqa: F401  (registers ddp, zero1, zero2, zero3)
from dtrain.plugins import co2  # noqa: F401  (registers co2)
from dtrain.plugins import snapshot  # noqa: F401  (registers snapshot)
