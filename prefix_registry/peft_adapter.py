"""PEFT PREFIX_TUNING adapters -> per-layer keys and values (without importing peft).

PEFT saves one tensor `prompt_embeddings` [T, num_layers * 2 * token_dim] (with
`prefix_projection` on, the MLP's output is what is saved). For grouped-query models PEFT rewrites
`token_dim = num_kv_heads * head_dim` and `num_attention_heads = num_kv_heads` in
adapter_config.json, so the layout is read from there and checked against the model:

    W.view(T, L, 2, H_kv, hd).permute(1, 2, 3, 0, 4) -> [L, 2 (k, v), H_kv, T, hd]

which is what `PeftModel.get_prompt` feeds the model as past keys/values.
"""

from __future__ import annotations

from typing import Any

import torch

from prefix_registry.errors import FingerprintMismatchError, InvalidPrefixError
from prefix_registry.fingerprint import ModelFingerprint

WEIGHT = "prompt_embeddings"


def is_peft_config(config: Any) -> bool:
    return isinstance(config, dict) and "peft_type" in config


def kv_from_peft(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelFingerprint
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values), each [num_layers, num_kv_heads, num_virtual_tokens, head_dim]."""
    _check_kind(config)
    if set(tensors) != {WEIGHT}:
        found = ", ".join(sorted(tensors)) or "none"
        raise InvalidPrefixError(
            f"a PEFT prefix-tuning adapter holds one tensor {WEIGHT!r}; found: {found}"
        )
    t, layers, heads, token_dim = (
        _int(config, k) for k in ("num_virtual_tokens", "num_layers", "num_attention_heads",
                                  "token_dim")
    )
    _check_model(layers, heads, token_dim, model)
    w = tensors[WEIGHT]  # [T, L * 2 * token_dim]
    if list(w.shape) != [t, layers * 2 * token_dim]:
        raise InvalidPrefixError(
            f"{WEIGHT} has shape {list(w.shape)}; adapter_config.json implies "
            f"[num_virtual_tokens={t}, num_layers * 2 * token_dim={layers * 2 * token_dim}]"
        )
    head_dim = token_dim // heads
    kv = w.reshape(t, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)  # [L, 2, H_kv, T, hd]
    return kv[:, 0].contiguous(), kv[:, 1].contiguous()


def _check_kind(config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        raise InvalidPrefixError(
            f"PEFT adapter type {peft_type!r} is not supported; only PREFIX_TUNING adapters are"
        )
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise InvalidPrefixError(f"PEFT task_type {task!r} is not supported; use CAUSAL_LM")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise InvalidPrefixError("encoder-decoder PEFT adapters are not supported")


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidPrefixError(f"adapter_config.json: {key} must be a positive integer")
    return value


def _check_model(layers: int, heads: int, token_dim: int, model: ModelFingerprint) -> None:
    wanted = {
        "num_layers": (layers, model.num_layers),
        "num_attention_heads (kv heads)": (heads, model.num_kv_heads),
        "token_dim (kv heads * head_dim)": (token_dim, model.num_kv_heads * model.head_dim),
    }
    for what, (got, expected) in wanted.items():
        if got != expected:
            raise FingerprintMismatchError(
                f"the PEFT adapter was made for another model: adapter_config.json has {what}="
                f"{got}, the served model {model.architecture} needs {expected}"
            )
