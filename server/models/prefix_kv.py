"""Prefix -> per-layer keys/values, and the model's own forward with a prefix in front.

Conventions (docs/architecture.md):
- seed form `p_theta`: [L, T, d_model]; per layer, K/V come from that layer's own frozen key/value
  projection (`Family.project_kv`): no layer norm before it, no rotary after it.
- direct form: keys, values, each [L, H_kv, T, head_dim], used as is.
- prefix keys carry no position; the text of a request with prefix length P takes positions
  P, P+1, ... (as PEFT does).
Serving and training both use these functions, so both see the same math.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from server.models.families import model_dims
from server.models.loader import LoadedModel

FORMS = ("p_theta", "kv")


def kv_from_p_theta(loaded: LoadedModel, p_theta: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of a seed-form prefix, each [L, H_kv, T, head_dim] in the model's dtype.

    Differentiable w.r.t. `p_theta` (the weights are frozen), so training backprops through it.
    """
    dims = model_dims(loaded.model.config)
    expected = (dims.num_layers, "T", dims.hidden_size)
    ok = p_theta.dim() == 3 and p_theta.shape[1] >= 1
    if not ok or (p_theta.shape[0], p_theta.shape[2]) != (dims.num_layers, dims.hidden_size):
        raise ValueError(
            f"p_theta must have shape {_shape(expected)} for this model, "
            f"got {_shape(p_theta.shape)}"
        )
    _check_floating("p_theta", p_theta)
    rows = p_theta.to(device=loaded.device, dtype=loaded.dtype)  # [L, T, d_model]
    project = loaded.family.project_kv
    pairs = [project(loaded.model, layer, rows[layer]) for layer in range(dims.num_layers)]
    keys = torch.stack([k for k, _ in pairs])  # [L, H_kv, T, hd]
    values = torch.stack([v for _, v in pairs])  # [L, H_kv, T, hd]
    return keys, values


def kv_from_direct(loaded: LoadedModel, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Direct-form keys/values, shape-checked against the model and cast to its dtype/device."""
    dims = model_dims(loaded.model.config)
    expected = (dims.num_layers, dims.num_kv_heads, "T", dims.head_dim)
    for name, tensor in (("keys", keys), ("values", values)):
        fixed = tuple(tensor.shape[i] for i in (0, 1, 3)) if tensor.dim() == 4 else ()
        if fixed != (dims.num_layers, dims.num_kv_heads, dims.head_dim) or tensor.shape[2] < 1:
            raise ValueError(
                f"prefix {name} must have shape {_shape(expected)} for this model, "
                f"got {_shape(tensor.shape)}"
            )
        _check_floating(name, tensor)
    if keys.shape != values.shape:
        raise ValueError(
            "prefix keys and values differ in shape: "
            f"{_shape(keys.shape)} vs {_shape(values.shape)}"
        )
    device, dtype = loaded.device, loaded.dtype
    return keys.to(device=device, dtype=dtype), values.to(device=device, dtype=dtype)


def prefix_kv(loaded: LoadedModel, form: str, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Keys/values [L, H_kv, T, hd] of a prefix in `form` "p_theta" ({"p_theta"}) or "kv"
    ({"keys", "values"})."""
    if form == "p_theta":
        return kv_from_p_theta(loaded, _tensor(tensors, "p_theta", form))
    if form == "kv":
        keys, values = _tensor(tensors, "keys", form), _tensor(tensors, "values", form)
        return kv_from_direct(loaded, keys, values)
    raise ValueError(f"unknown prefix form {form!r}: use one of {', '.join(FORMS)}")


def forward_with_prefix(
    loaded_or_model: LoadedModel | PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    keys: Tensor | None,
    values: Tensor | None,
) -> Tensor:
    """The model's own forward over `input_ids` [B, S] with the prefix as past keys/values.

    `keys`/`values` are [L, H_kv, P, hd] (None for no prefix); `attention_mask` [B, S] marks real
    tokens (left or right padding; None = all real). Text positions are P + the index among the
    row's real tokens. Inputs are moved to the model's device. Returns logits [B, S, vocab];
    autograd flows into keys/values.
    """
    model = loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model
    if (keys is None) != (values is None):
        raise ValueError("a prefix needs both keys and values (or neither)")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    text_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    cache = None if keys is None or values is None else _cache(model, keys, values, batch)
    prefix_len = 0 if keys is None else keys.shape[2]
    # Padding slots reuse a real neighbour's position; the mask hides them anyway.
    positions = (text_mask.long().cumsum(-1) - 1).clamp(min=0) + prefix_len  # [B, S]
    prefix_mask = text_mask.new_ones(batch, prefix_len)
    out = model(
        input_ids=input_ids,
        attention_mask=torch.cat([prefix_mask, text_mask], dim=1),  # [B, P + S]
        position_ids=positions,
        cache=cache,
        use_cache=cache is not None,
    )
    logits: Tensor = out.logits
    return logits


def _cache(model: PreTrainedModel, keys: Tensor, values: Tensor, batch: int) -> DynamicCache:
    """A DynamicCache holding the prefix, one [B, H_kv, P, hd] (k, v) pair per layer."""
    param = next(model.parameters())
    keys = keys.to(device=param.device, dtype=param.dtype)
    values = values.to(device=param.device, dtype=param.dtype)
    per_layer = [
        (k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1))
        for k, v in zip(keys, values, strict=True)
    ]
    return DynamicCache(ddp_cache_data=per_layer)


def _tensor(tensors: dict[str, Tensor], name: str, form: str) -> Tensor:
    if name not in tensors:
        raise ValueError(f"a {form!r} prefix needs a tensor named {name!r}, got {sorted(tensors)}")
    return tensors[name]


def _check_floating(name: str, tensor: Tensor) -> None:
    if not torch.is_floating_point(tensor):
        raise ValueError(f"prefix {name} must be a floating-point tensor, got {tensor.dtype}")


def _shape(shape: tuple[object, ...] | torch.Size) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
