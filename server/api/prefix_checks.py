"""Whether an uploaded prefix can ever be served by this server, checked before it is stored.

The registry validates shapes and finiteness of the stored tensors; two things only the served
model can tell:
- a prefix of `prefix_len` virtual tokens leaves room for at least one prompt token and one
  generated token in the model's context, or no request could ever use it;
- its keys/values as the model sees them are finite, and so is a forward pass over them: a seed
  form `p_theta` of huge but finite values (3e38) projects to inf, and huge direct-form keys
  overflow the attention scores, each giving NaN for every request that uses them.
"""

from __future__ import annotations

import torch

from prefix_registry.artifact import PrefixArtifact
from server.errors import ValidationError
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


def _probe_token(loaded: LoadedModel) -> int:
    token = loaded.tokenizer.bos_token_id
    return int(token) if token is not None else 0
