"""Process-level runtime: the process group, the device, the topology and the comm layer.

:func:`init` is idempotent. It reads the launch environment (``dtrain launch``, torchrun, or a
plain single process), initialises torch.distributed with the backend that fits the device
(NCCL on CUDA, gloo otherwise) unless the script already did, and builds the groups of every
level: ``node``, ``global`` and those declared in ``topology.levels``, the same way under every
launcher (``dtrain launch``, ``--ray``, plain torchrun, a single process), since every launcher
hands the config and ``--set`` overrides to the ranks. See docs/topology.md.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dtrain.comm import Comm
from dtrain.config import Config
from dtrain.launch.env import LaunchEnv, read_launch_env
from dtrain.topology import Shape, Topology


@dataclass
class Runtime:
    env: LaunchEnv
    device: torch.device
    topology: Topology
    comm: Comm

    @property
    def rank(self) -> int:
        return self.topology.shape.rank

    @property
    def world_size(self) -> int:
        return self.topology.shape.world_size


_RUNTIME: Runtime | None = None


def init(config: Config | None = None) -> Runtime:
    """Initialise (once) and return the process runtime for ``config``."""
    global _RUNTIME
    config = config or Config()
    if _RUNTIME is not None:
        _RUNTIME.comm.timeout_s = config.comm.timeout_s
        _RUNTIME.topology.add_levels(config.topology.levels)  # collective only if levels are new
        return _RUNTIME
    env = read_launch_env()
    backend = config.comm.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    world = env.world_size
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group(backend, rank=env.rank, world_size=world,
                                timeout=datetime.timedelta(seconds=config.comm.timeout_s))
        # A process group (or a subgroup still referenced by the topology) left alive at
        # interpreter exit can abort the process while its threads are torn down ("terminate
        # called without an active exception"): destroy every group and drop our references
        # while the interpreter is still whole.
        atexit.register(shutdown)
    elif dist.is_initialized():
        world = dist.get_world_size()
    nodes = config.topology.nodes or (env.nodes if env.world_size == world else 1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    shape = Shape.of(world, rank, nodes, config.topology.levels)  # TopologyError names the mismatch
    topology = Topology.build(shape)
    _RUNTIME = Runtime(env, device, topology, Comm(topology, config.comm.timeout_s))
    return _RUNTIME


def shutdown() -> None:
    """Destroy the process group (if dtrain created one) and forget the runtime."""
    global _RUNTIME
    if dist.is_initialized():
        dist.destroy_process_group()
    _RUNTIME = None
    gc.collect()  # release the C++ group objects now, not during interpreter finalization
