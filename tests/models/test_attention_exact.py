"""Each layer's attention, run by the model with a seed-form prefix injected through
`forward_with_prefix(kv_from_p_theta(...))`, equals the test's own from-scratch
`Attention(Q, [P_k; K], [P_v; V])` (tests/models/reference.py) on that layer's captured input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from server.models.loader import LoadedModel
from server.models.prefix_kv import forward_with_prefix, kv_from_p_theta
from tests.models.reference import attention_modules, prefix_attention
from tests.tiny import FAMILIES

PREFIX_LEN, SEQ = 3, 6


def _capture(modules: list[nn.Module]) -> tuple[list[dict[str, Tensor]], list[Any]]:
    """Hooks that record each attention module's input hidden states and output."""
    records: list[dict[str, Tensor]] = [{} for _ in modules]

    def hook(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            records[index]["input"] = kwargs["hidden_states"] if not args else args[0]
            records[index]["output"] = output[0]

        return record

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    return records, handles


def _run_with_prefix(loaded: LoadedModel, p_theta: Tensor, ids: Tensor) -> list[dict[str, Tensor]]:
    records, handles = _capture(attention_modules(loaded.family.name, loaded.model))
    try:
        with torch.no_grad():
            keys, values = kv_from_p_theta(loaded, p_theta)
            forward_with_prefix(loaded, ids, None, keys, values)
    finally:
        for handle in handles:
            handle.remove()
    return records


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_matches_from_scratch_prefix_attention(
    loaded_tiny: Callable[..., LoadedModel], family: str
) -> None:
    loaded = loaded_tiny(family)
    config = loaded.model.config
    assert not getattr(config, "scale_attn_by_inverse_layer_idx", False)  # the reference omits it
    gen = torch.Generator().manual_seed(11)
    p_theta = torch.randn(config.num_hidden_layers, PREFIX_LEN, config.hidden_size, generator=gen)
    ids = torch.randint(4, config.vocab_size, (1, SEQ), generator=gen)

    records = _run_with_prefix(loaded, p_theta, ids)

    modules = attention_modules(family, loaded.model)
    for layer, (module, record) in enumerate(zip(modules, records, strict=True)):
        with torch.no_grad():
            expected = prefix_attention(family, module, config, record["input"][0], p_theta[layer])
        torch.testing.assert_close(
            record["output"][0], expected, atol=1e-5, rtol=0, msg=f"{family} layer {layer}"
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_sensitive_to_the_prefix(
    loaded_tiny: Callable[..., LoadedModel], family: str
) -> None:
    """The comparison above can fail: a different prefix gives a clearly different output."""
    loaded = loaded_tiny(family)
    config = loaded.model.config
    gen = torch.Generator().manual_seed(12)
    p_theta = torch.randn(config.num_hidden_layers, PREFIX_LEN, config.hidden_size, generator=gen)
    ids = torch.randint(4, config.vocab_size, (1, SEQ), generator=gen)
    record = _run_with_prefix(loaded, p_theta, ids)[0]
    module = attention_modules(family, loaded.model)[0]
    with torch.no_grad():
        other = prefix_attention(family, module, config, record["input"][0], p_theta[0] * 0.5)
    assert (record["output"][0] - other).abs().max() > 1e-3


def test_gpt2_text_positions_start_after_the_prefix(
    loaded_tiny: Callable[..., LoadedModel],
) -> None:
    """GPT-2's learned positions: layer 0 sees LayerNorm(wte[ids] + wpe[P .. P+S-1])."""
    loaded = loaded_tiny("gpt2")
    config, transformer = loaded.model.config, loaded.model.transformer
    gen = torch.Generator().manual_seed(13)
    p_theta = torch.randn(config.num_hidden_layers, PREFIX_LEN, config.hidden_size, generator=gen)
    ids = torch.randint(4, config.vocab_size, (1, SEQ), generator=gen)
    record = _run_with_prefix(loaded, p_theta, ids)[0]
    embedded = (
        transformer.wte.weight[ids[0]] + transformer.wpe.weight[PREFIX_LEN : PREFIX_LEN + SEQ]
    )
    ln = transformer.h[0].ln_1
    expected = torch.nn.functional.layer_norm(
        embedded, (config.hidden_size,), ln.weight, ln.bias, ln.eps
    )
    torch.testing.assert_close(record["input"][0], expected, atol=1e-5, rtol=0)
