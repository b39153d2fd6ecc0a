"""On a CUDA device: mixed-precision training (bf16 autocast; fp16 with a grad scaler)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.models.loader import load_model
from server.training.config import TrainConfig
from server.training.loop import train_prefix
from tests.training.tasks import YES, prompts, records

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_mixed_precision_training_on_cuda(tiny_model_dir, tmp_path, precision):
    loaded = load_model(str(tiny_model_dir("llama")), dtype="float32", device="cuda")
    cfg = TrainConfig(prefix_len=8, epochs=0, max_steps=40, batch_size=8, lr=0.3,
                      val_fraction=0.2, precision=precision, progress=False,
                      checkpoint_dir=tmp_path, checkpoint_every=20)
    result = train_prefix(loaded, records(YES, prompts(40, seed=1)), config=cfg)
    assert result.p_theta.dtype == torch.float32 and not result.p_theta.is_cuda
    assert result.no_prefix_val_loss is not None and result.val_loss is not None
    assert result.val_loss < 0.8 * result.no_prefix_val_loss
    # A resume from the middle checkpoint (CUDA RNG and, for fp16, the scaler restored) finishes.
    again = train_prefix(loaded, records(YES, prompts(40, seed=1)),
                         config=dataclasses.replace(cfg, checkpoint_dir=None,
                                                    resume_from=tmp_path / "step-00000020"))
    assert again.steps == 40
    torch.testing.assert_close(again.p_theta, result.p_theta, rtol=0, atol=1e-3)
