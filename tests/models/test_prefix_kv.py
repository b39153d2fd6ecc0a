"""Prefix K/V math: shapes, checks, casts, padding, determinism and gradients."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from server.models.loader import LoadedModel, load_model
from server.models.prefix_kv import (
    forward_with_prefix,
    kv_from_direct,
    kv_from_p_theta,
    prefix_kv,
)
from tests.tiny import FAMILIES

Loader = Callable[..., LoadedModel]


def _p_theta(loaded: LoadedModel, length: int = 3, seed: int = 0) -> Tensor:
    config = loaded.model.config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(config.num_hidden_layers, length, config.hidden_size, generator=gen)


def _ids(loaded: LoadedModel, batch: int = 1, seq: int = 5, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, loaded.model.config.vocab_size, (batch, seq), generator=gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_p_theta_gives_per_layer_kv_of_the_model_shape(loaded_tiny: Loader, family: str) -> None:
    loaded = loaded_tiny(family)
    fp = loaded.fingerprint
    keys, values = kv_from_p_theta(loaded, _p_theta(loaded, length=3))
    assert keys.shape == values.shape == (fp.num_layers, fp.num_kv_heads, 3, fp.head_dim)
    assert keys.dtype == values.dtype == torch.float32
    same = prefix_kv(loaded, "p_theta", {"p_theta": _p_theta(loaded, length=3)})
    assert torch.equal(same[0], keys) and torch.equal(same[1], values)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefixes_change_logits_deterministically(loaded_tiny: Loader, family: str) -> None:
    loaded = loaded_tiny(family)
    ids = _ids(loaded)
    with torch.no_grad():
        first = forward_with_prefix(loaded, ids, None, *kv_from_p_theta(loaded, _p_theta(loaded)))
        again = forward_with_prefix(loaded, ids, None, *kv_from_p_theta(loaded, _p_theta(loaded)))
        other = kv_from_p_theta(loaded, _p_theta(loaded, seed=7))
        different = forward_with_prefix(loaded, ids, None, *other)
    assert first.shape == (1, 5, loaded.model.config.vocab_size)
    assert torch.equal(first, again)
    assert (first - different).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_match_their_solo_runs(loaded_tiny: Loader, family: str) -> None:
    """Left- and right-padded rows in one batch give the logits each row gets alone."""
    loaded = loaded_tiny(family)
    keys, values = kv_from_p_theta(loaded, _p_theta(loaded))
    short, full = _ids(loaded, seq=3, seed=2), _ids(loaded, seq=5, seed=3)
    pad = torch.zeros(1, 2, dtype=torch.long)
    ones, zeros = torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        alone = forward_with_prefix(loaded, short, None, keys, values)[0]
        solo_full = forward_with_prefix(loaded, full, None, keys, values)[0]
        for ids, mask, real in (
            (torch.cat([pad, short], 1), torch.cat([zeros, ones], 1), slice(2, 5)),  # left
            (torch.cat([short, pad], 1), torch.cat([ones, zeros], 1), slice(0, 3)),  # right
        ):
            batch = forward_with_prefix(
                loaded,
                torch.cat([ids, full]),
                torch.cat([mask, torch.ones_like(full)]),
                keys,
                values,
            )
            torch.testing.assert_close(batch[0, real], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(batch[1], solo_full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_sdpa_and_eager_agree(
    loaded_tiny: Loader, tiny_model_dir: Callable[..., Path], family: str
) -> None:
    eager = loaded_tiny(family)
    sdpa = load_model(str(tiny_model_dir(family)), dtype="float32", attn_implementation="sdpa")
    ids = _ids(eager, batch=2)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        kv = kv_from_p_theta(eager, _p_theta(eager))
        a = forward_with_prefix(eager, ids, mask, *kv)
        b = forward_with_prefix(sdpa.model, ids, mask, *kv)
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_layer_of_p_theta(loaded_tiny: Loader, family: str) -> None:
    loaded = loaded_tiny(family)
    p_theta = _p_theta(loaded).requires_grad_(True)
    logits = forward_with_prefix(loaded, _ids(loaded), None, *kv_from_p_theta(loaded, p_theta))
    logits.logsumexp(-1).mean().backward()
    assert p_theta.grad is not None and torch.isfinite(p_theta.grad).all()
    assert all(p_theta.grad[layer].abs().sum() > 0 for layer in range(len(p_theta)))
    assert not any(p.grad is not None for p in loaded.model.parameters())


def test_gradients_reach_direct_keys_and_values(loaded_tiny: Loader) -> None:
    loaded = loaded_tiny("qwen2")
    keys, values = (
        t.detach().requires_grad_(True) for t in kv_from_p_theta(loaded, _p_theta(loaded))
    )
    forward_with_prefix(loaded, _ids(loaded), None, keys, values).logsumexp(-1).mean().backward()
    assert keys.grad is not None and keys.grad.abs().sum() > 0
    assert values.grad is not None and values.grad.abs().sum() > 0


def test_direct_form_is_cast_to_the_model(loaded_tiny: Loader, tiny_model_dir: Callable) -> None:
    loaded = loaded_tiny("llama")
    keys, values = (t.double() for t in kv_from_p_theta(loaded, _p_theta(loaded)))
    cast = prefix_kv(loaded, "kv", {"keys": keys, "values": values})
    assert cast[0].dtype == cast[1].dtype == torch.float32
    bf16 = load_model(str(tiny_model_dir("llama")), dtype="bfloat16")
    k16, v16 = kv_from_direct(bf16, keys, values)
    assert k16.dtype == v16.dtype == torch.bfloat16
    with torch.no_grad():  # float32 p_theta on a bf16 model is cast, not an error
        logits = forward_with_prefix(bf16, _ids(bf16), None, *kv_from_p_theta(bf16, _p_theta(bf16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize(
    ("shape", "what"),
    [
        ((3, 2, 4, 16), "layers"),
        ((2, 4, 4, 16), "kv heads"),
        ((2, 2, 4, 8), "head_dim"),
        ((2, 4, 16), "3-d"),
        ((2, 2, 0, 16), "empty"),
    ],
)
def test_direct_form_with_wrong_shape_is_refused(
    loaded_tiny: Loader, shape: tuple[int, ...], what: str
) -> None:
    loaded = loaded_tiny("llama")  # expects [2, 2, T, 16]
    bad = torch.zeros(shape)
    with pytest.raises(ValueError) as info:
        kv_from_direct(loaded, bad, bad)
    assert "[2, 2, T, 16]" in str(info.value), what
    assert "[" + ", ".join(map(str, shape)) + "]" in str(info.value), what


def test_direct_form_other_refusals(loaded_tiny: Loader) -> None:
    loaded = loaded_tiny("llama")
    with pytest.raises(ValueError, match="differ in shape"):
        kv_from_direct(loaded, torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 4, 16))
    with pytest.raises(ValueError, match="floating-point"):
        kv_from_direct(loaded, torch.zeros(2, 2, 3, 16, dtype=torch.long), torch.zeros(2, 2, 3, 16))


@pytest.mark.parametrize("shape", [(2, 3, 32), (3, 3, 64), (3, 64), (2, 0, 64)])
def test_p_theta_with_wrong_shape_is_refused(loaded_tiny: Loader, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\[2, T, 64\]"):
        kv_from_p_theta(loaded_tiny("llama"), torch.zeros(shape))


def test_prefix_kv_refuses_unknown_forms_and_missing_tensors(loaded_tiny: Loader) -> None:
    loaded = loaded_tiny("llama")
    with pytest.raises(ValueError, match="unknown prefix form 'lora'"):
        prefix_kv(loaded, "lora", {})
    with pytest.raises(ValueError, match="'values'"):
        prefix_kv(loaded, "kv", {"keys": torch.zeros(2, 2, 3, 16)})
    with pytest.raises(ValueError, match="'p_theta'"):
        prefix_kv(loaded, "p_theta", {"keys": torch.zeros(2, 2, 3, 16)})


def test_forward_needs_both_keys_and_values(loaded_tiny: Loader) -> None:
    loaded = loaded_tiny("llama")
    keys, _ = kv_from_p_theta(loaded, _p_theta(loaded))
    with pytest.raises(ValueError, match="both keys and values"):
        forward_with_prefix(loaded, _ids(loaded), None, keys, None)
