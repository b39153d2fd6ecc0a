"""Whole-model logits with a direct-form prefix equal HF PEFT's PrefixTuning forward.

PEFT's `generate` drops the prefix on transformers 5.x, so forwards are compared. PEFT builds
the cache from its own prompt encoder; the test converts PEFT's past key values into our
[L, H_kv, T, hd] layout itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from torch import Tensor

from server.models.loader import LoadedModel, load_model
from server.models.prefix_kv import forward_with_prefix, kv_from_direct
from tests.tiny import FAMILIES

PREFIX_LEN = 4
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT on transformers 5.x


def _peft_prefix_model(loaded: LoadedModel) -> PeftModel:
    peft_model = get_peft_model(
        loaded.model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LEN)
    )
    gen = torch.Generator().manual_seed(5)
    weight = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=gen))
    peft_model.eval()
    return peft_model


def _peft_keys_values(peft_model: PeftModel) -> tuple[Tensor, Tensor]:
    """PEFT's own prompt cache (batch 1) as keys, values [L, H_kv, T, hd]."""
    cache = peft_model.get_prompt(batch_size=1)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys.detach(), values.detach()


def _batch(vocab: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(4, vocab, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding: the real tokens' positions agree in both conventions
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_prefix_logits_equal_peft_prefix_tuning(
    tiny_model_dir: Callable[..., Path], family: str
) -> None:
    loaded = load_model(str(tiny_model_dir(family)), dtype="float32")  # PEFT wraps its own copy
    peft_model = _peft_prefix_model(loaded)
    keys, values = _peft_keys_values(peft_model)
    ids, mask = _batch(loaded.model.config.vocab_size)

    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        got = forward_with_prefix(loaded, ids, mask, *kv_from_direct(loaded, keys, values))
        plain = forward_with_prefix(loaded, ids, mask, None, None)

    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert (plain[real] - expected[real]).abs().max() > 1e-2  # the prefix matters


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_saved_embedding_layout(tiny_model_dir: Callable[..., Path], family: str) -> None:
    """PEFT's saved `prompt_embeddings` [T, L*2*H_kv*hd] reads as W.view(T, L, 2, H_kv, hd)
    permuted to [L, 2, H_kv, T, hd] - the layout importers of PEFT adapters rely on."""
    loaded = load_model(str(tiny_model_dir(family)), dtype="float32")
    peft_model = _peft_prefix_model(loaded)
    keys, values = _peft_keys_values(peft_model)
    saved = peft_model.get_prompt_embedding_to_save("default")  # [T, L * 2 * H_kv * hd]
    num_layers, kv_heads, _, head_dim = keys.shape
    layout = saved.view(PREFIX_LEN, num_layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
    torch.testing.assert_close(layout[:, 0], keys, atol=0, rtol=0)
    torch.testing.assert_close(layout[:, 1], values, atol=0, rtol=0)
