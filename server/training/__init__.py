"""`prefix-train`: learn a Prefix-Tuning prefix for the frozen base model (see docs/training.md).

    from server.training import TrainConfig, train_prefix
    result = train_prefix("./my-model", "data.jsonl", config=TrainConfig(prefix_len=10))
    result.p_theta  # [num_layers, prefix_len, d_model], ready for the registry
"""

from server.training.config import TrainConfig, TrainConfigError, TrainResult
from server.training.data import DataError
from server.training.loop import train_prefix

__all__ = ["DataError", "TrainConfig", "TrainConfigError", "TrainResult", "train_prefix"]
