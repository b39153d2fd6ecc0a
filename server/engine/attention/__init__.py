"""Attention over the paged KV pool, plugged into the model's own Hugging Face forward.

`install(model)` registers one attention function with transformers (`AttentionInterface`) and
switches the model to it. A forward that carries `paged=StepAttention(...)` (the runner's, one per
step) writes the step's new keys/values into the pool, then attends through each row's blocks
(its shared prefix blocks, then its own); any other forward (training, reference checks) runs the
model's original implementation (eager or SDPA) unchanged, so one loaded model serves both.

The model computes queries, keys and values itself (projections, rotary, norms), so every
supported family runs its own code; only the attention over the cache is ours. Backends compute
it (`backends.py`); the runner describes each step's rows with `RowLayout` and never touches
their metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from server.engine.attention.layout import RowLayout, StepLayout
from server.engine.attention.step import StepAttention

__all__ = ["RowLayout", "StepAttention", "StepLayout", "install"]

_PREFIX = "prefix_serve_"


def install(model: PreTrainedModel) -> str:
    """Switch `model` to the paged attention function (idempotent); returns its name."""
    current = model.config._attn_implementation
    if current.startswith(_PREFIX):
        return current
    if current not in ("eager", "sdpa"):
        raise ValueError(f"unsupported attention implementation {current!r} (use eager or sdpa)")
    name = _PREFIX + current
    AttentionInterface.register(name, _dispatch(current))
    # Forwards without `paged` build their masks exactly as the original implementation does.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    return name


def _dispatch(original: str) -> Callable[..., tuple[torch.Tensor, None]]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        step = kwargs.pop("paged", None)
        if step is None:
            fn = _original(module, original)
            return fn(module, query, key, value, attention_mask, scaling=scaling,
                      dropout=dropout, **kwargs)
        assert isinstance(step, StepAttention)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return step.attend(int(module.layer_idx), query, key, value, scale), None  # type: ignore[arg-type]

    return attention


def _original(module: torch.nn.Module, name: str) -> Callable[..., Any]:
    if name == "eager":  # each family's modeling module defines its own eager function
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]
