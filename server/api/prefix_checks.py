"""Whether an uploaded prefix can ever be served by this server, checked before it is stored.

The registry validates shapes and finiteness of the stored tensors; two things only the served
model can tell:
- a prefix of `prefix_len` virtual tokens leaves room for at least one prompt token and one
  generated token in the model's context, or no request could ever use it;
- its keys/values as the model sees them are finite, and so is a forward pass over them: a seed
  form `p_theta` of huge but finite values (3e38) projects to inf, and huge direct-form keys
  overflow the attention scores, each giving NaN for every request that uses them;
- every key/value element (computed in the served dtype, from either form) is at most
  `kv_bound` = sqrt(max(dtype) / head_dim) in magnitude: then no query within the same bound
  can make an unscaled score q.k overflow (head_dim products of at most max(dtype) / head_dim),
  and attention's normalised sum of values stays within it too. Real keys/values are many orders
  of magnitude smaller (float32/bfloat16: 2.3e18 for head_dim 64; float16: 32).
The engine does not rely on these checks to keep tenants apart (docs/security.md, KV hygiene).
"""

from __future__ import annotations

import math

import torch

from prefix_registry.artifact import PrefixArtifact
from server.errors import ValidationError
from server.models.families import model_dims
from server.models.loader import LoadedModel, ModelInfo
from server.models.prefix_kv import forward_with_prefix, prefix_kv

MIN_TEXT_TOKENS = 2  # one prompt token and one generated token


def check_servable(loaded: ModelInfo, artifact: PrefixArtifact, context: int) -> None:
    """ValidationError (422) when no request could ever be served with this prefix (blocking:
    it runs the model once). Behind Ray Serve the ingress holds no weights: only the length is
    checked there."""
    meta = artifact.meta
    if meta.prefix_len + MIN_TEXT_TOKENS > context:
        raise ValidationError(
            f"the prefix has {meta.prefix_len} virtual tokens; with one prompt and one "
            f"generated token that exceeds this server's context of {context} tokens"
        )
    if isinstance(loaded, LoadedModel):
        _check_finite_outputs(loaded, artifact)


def _check_finite_outputs(loaded: LoadedModel, artifact: PrefixArtifact) -> None:
    meta = artifact.meta
    with torch.inference_mode():
        keys, values = prefix_kv(loaded, meta.form, artifact.tensors)  # [L, H_kv, T, hd] each
        if not (bool(torch.isfinite(keys).all()) and bool(torch.isfinite(values).all())):
            raise ValidationError(
                "the prefix's keys/values are not finite in the served model (values too large "
                f"for {str(loaded.dtype).removeprefix('torch.')}?)"
            )
        probe = torch.tensor([[_probe_token(loaded)]])  # [1, 1]
        logits = forward_with_prefix(loaded, probe, None, keys, values)  # [1, 1, vocab]
        if not bool(torch.isfinite(logits).all()):
            raise ValidationError("the model's outputs with this prefix are not finite "
                                  "(its values are too large)")
        _check_magnitude(loaded, keys, values)


def kv_bound(dtype: torch.dtype, head_dim: int) -> float:
    """The largest |key/value element| a prefix may have: sqrt(max(dtype) / head_dim)."""
    return math.sqrt(torch.finfo(dtype).max / head_dim)


def _check_magnitude(loaded: LoadedModel, keys: torch.Tensor, values: torch.Tensor) -> None:
    head_dim = model_dims(loaded.model.config).head_dim
    bound = kv_bound(loaded.dtype, head_dim)
    largest = max(float(keys.abs().max()), float(values.abs().max()))
    if largest > bound:
        dtype = str(loaded.dtype).removeprefix("torch.")
        raise ValidationError(
            f"the prefix's keys/values reach |x| = {largest:.3g} in the served model; the rule "
            f"is |x| <= sqrt(max({dtype}) / head_dim) = sqrt({torch.finfo(loaded.dtype).max:.3g}"
            f" / {head_dim}) = {bound:.3g}, so that no attention score can overflow"
        )


def _probe_token(loaded: LoadedModel) -> int:
    token = loaded.tokenizer.bos_token_id
    return int(token) if token is not None else 0
