"""Shared pytest setup: one torch thread per process (2-core machines), deterministic seeds."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import torch  # noqa: E402

torch.set_num_threads(1)
