"""`prefix-train`: learn a Prefix-Tuning prefix for the frozen base model (see docs/training.md).

    from server.training import TrainConfig, train_prefix
    result = train_prefix("./my-model", "data.jsonl", config=TrainConfig(prefix_len=10))
    result.p_theta  # [num_layers, prefix_len, d_model], ready for the registry

Names are imported lazily, so `prefix-train --help` answers without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.training.config import TrainConfig, TrainConfigError, TrainResult
    from server.training.data import DataError
    from server.training.loop import train_prefix

_WHERE = {
    "TrainConfig": "server.training.config",
    "TrainConfigError": "server.training.config",
    "TrainResult": "server.training.config",
    "DataError": "server.training.data",
    "train_prefix": "server.training.loop",
}

__all__ = ["DataError", "TrainConfig", "TrainConfigError", "TrainResult", "train_prefix"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
