"""On a CUDA device: the defaults (device, attention) and the same logits as on CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from server.models.loader import LoadedModel, load_model
from server.models.prefix_kv import forward_with_prefix, kv_from_p_theta
from tests.tiny import FAMILIES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_defaults_and_logits_match_cpu(
    loaded_tiny: Callable[..., LoadedModel], tiny_model_dir: Callable[..., Path], family: str
) -> None:
    cpu = loaded_tiny(family)
    gpu = load_model(str(tiny_model_dir(family)))  # auto: CUDA, checkpoint dtype (float32), sdpa
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert gpu.model.config._attn_implementation == "sdpa"
    assert next(gpu.model.parameters()).is_cuda
    assert gpu.fingerprint == cpu.fingerprint
    gen = torch.Generator().manual_seed(3)
    config = cpu.model.config
    p_theta = torch.randn(config.num_hidden_layers, 3, config.hidden_size, generator=gen)
    ids = torch.randint(4, config.vocab_size, (2, 6), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = forward_with_prefix(cpu, ids, mask, *kv_from_p_theta(cpu, p_theta))
        got = forward_with_prefix(
            gpu,
            ids.cuda(),
            mask.cuda(),
            *kv_from_p_theta(gpu, p_theta),  # p_theta moved for us
        )
    torch.testing.assert_close(got.cpu()[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=0)


def test_cuda_bf16_with_float32_prefix(tiny_model_dir: Callable[..., Path]) -> None:
    gpu = load_model(str(tiny_model_dir("qwen3")), dtype="bfloat16", device="cuda:0")
    config = gpu.model.config
    p_theta = torch.randn(config.num_hidden_layers, 3, config.hidden_size)
    ids = torch.randint(4, config.vocab_size, (1, 6), device="cuda")
    with torch.no_grad():
        logits = forward_with_prefix(gpu, ids, None, *kv_from_p_theta(gpu, p_theta))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
