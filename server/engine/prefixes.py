"""A prefix's keys/values for the served model, checked before they go into the KV pool."""

from __future__ import annotations

import torch

from server.engine.request import PrefixSource
from server.errors import IncompatiblePrefixError
from server.models.loader import LoadedModel
from server.models.prefix_kv import prefix_kv


def prefix_keys_values(
    loaded: LoadedModel, source: PrefixSource
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [L, H_kv, P, hd] of `source` in the model's dtype, on its device (engine thread).

    Raises IncompatiblePrefixError when the prefix was made for another model, has the wrong
    shapes, does not hold its declared number of tokens, or projects to non-finite values.
    """
    if source.fingerprint is not None:
        why = loaded.fingerprint.mismatch(source.fingerprint)
        if why is not None:
            raise IncompatiblePrefixError(f"prefix {source.name!r}: {why}")
    try:
        with torch.no_grad():
            keys, values = prefix_kv(loaded, source.form, source.tensors)
    except ValueError as exc:
        raise IncompatiblePrefixError(f"prefix {source.name!r}: {exc}") from exc
    if keys.shape[2] != source.prefix_len:
        raise IncompatiblePrefixError(
            f"prefix {source.name!r} declares {source.prefix_len} tokens but holds "
            f"{keys.shape[2]}"
        )
    if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
        raise IncompatiblePrefixError(f"prefix {source.name!r} gives non-finite keys/values")
    return keys, values
