"""Fault injection: kill a rank, lose a node, slow or hang a rank, corrupt a snapshot, shape the network.

Use it from the command line (``dtrain launch --inject kill:rank=1,step=20 ...``, repeatable) or
from pytest (pass the same strings in ``DTRAIN_INJECT``). :mod:`dtrain.faults.spec` parses and
validates specs; :mod:`dtrain.faults.inject` fires them inside the training processes.
"""
from dtrain.faults.inject import FaultInjector, last_fault
from dtrain.faults.spec import KINDS, Fault, FaultSpecError, parse, parse_all

__all__ = ["FaultInjector", "last_fault", "KINDS", "Fault", "FaultSpecError", "parse", "parse_all"]
