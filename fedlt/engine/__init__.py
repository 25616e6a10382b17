"""The round engine: simulator, the single local loop, sharding, collectives, parameters, client state,
checkpoints.

The names below are imported on first use (PEP 562), so that importing a submodule (``fedlt.engine.collectives``
from the method registry, say) does not pull in the simulator, the evaluator and torchmetrics.
"""

from __future__ import annotations

from fedlt._lazy import lazy_names

_NAMES = {
    "PreemptionFlag": "checkpoint", "latest_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "save_atomic": "checkpoint", "ClientStateStore": "client_state", "LocalTrainer": "local_loop",
    "NonFiniteLossError": "local_loop", "assign_to_ranks": "sharding", "client_seed": "sharding",
    "sample_cohort": "sharding", "RoundResult": "simulator", "Simulator": "simulator",
}

__all__ = sorted(_NAMES)

__getattr__, __dir__ = lazy_names(__name__, _NAMES, globals())
