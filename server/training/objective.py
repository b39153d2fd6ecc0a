"""The training forward and its loss: the served model's own forward, with the prefix as past K/V.

`prefix_logits` goes through exactly the functions the server uses (`kv_from_p_theta`, then
`forward_with_prefix`), so what the optimizer sees is what a request will see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from server.models.loader import LoadedModel
from server.models.prefix_kv import forward_with_prefix, kv_from_p_theta
from server.training.config import TrainConfigError
from server.training.data import IGNORE, Batch


def prefix_logits(loaded: LoadedModel, p_theta: Tensor | None, batch: Batch) -> Tensor:
    """Logits [B, S, vocab] of `batch` behind the prefix `p_theta` [L, T, d_model] (None: none)."""
    keys = values = None
    if p_theta is not None:
        keys, values = kv_from_p_theta(loaded, p_theta)  # each [L, H_kv, T, hd]
    return forward_with_prefix(loaded, batch.input_ids, batch.attention_mask, keys, values)


def masked_nll_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy of the loss-bearing tokens (labels != IGNORE), in float32.

    `logits` [B, S, V] at position i predict the token at i + 1, so they pair with labels[:, 1:].
    """
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [B * (S - 1), V]
    targets = labels[:, 1:].reshape(-1)  # [B * (S - 1)]
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum")


def mean_loss(
    loaded: LoadedModel, p_theta: Tensor | None, batches: Sequence[Batch], precision: str = "fp32"
) -> float:
    """Token-weighted mean loss over `batches` (no gradients)."""
    total, count = 0.0, 0
    with torch.no_grad(), autocast(loaded.device, precision):
        for batch in batches:
            on_device = batch.to(loaded.device)
            logits = prefix_logits(loaded, p_theta, on_device)  # [B, S, vocab]
            total += float(masked_nll_sum(logits, on_device.labels))
            count += batch.num_labels
    return total / max(count, 1)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain float32 math."""
    if precision == "auto":
        has_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if has_bf16 else None
    if precision == "fp16" and device.type != "cuda":
        raise TrainConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(
    device: torch.device, precision: str
) -> contextlib.AbstractContextManager[object]:
    """Mixed-precision autocast for the forward (the prefix and optimizer stay float32)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
