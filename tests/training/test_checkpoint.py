"""Checkpoint and resume: an interrupted run resumed from its checkpoint ends bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from server.training.checkpoint import CheckpointError
from server.training.config import TrainConfig
from server.training.loop import train_prefix
from tests.training.tasks import NO, YES, prompts, records


def _config(**kw) -> TrainConfig:
    base = {"prefix_len": 4, "epochs": 0, "max_steps": 6, "batch_size": 4, "lr": 0.05,
            "warmup_steps": 2, "eval_every": 2, "checkpoint_every": 3, "init": "random",
            "progress": False}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("reparam", ["none", "mlp"])
def test_resume_matches_an_uninterrupted_run(tiny_llama, tmp_path, reparam):
    train, val = records(YES, prompts(10, seed=1)), records(YES, prompts(4, seed=2))
    full = train_prefix(tiny_llama, train, val_data=val,
                        config=_config(checkpoint_dir=tmp_path / "a", reparam=reparam, patience=5,
                                       mlp_hidden=16))
    middle = tmp_path / "a" / "step-00000003"
    assert sorted(p.name for p in middle.iterdir()) == ["state.json", "tensors.safetensors"]
    saved = load_file(str(middle / "tensors.safetensors"))
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in saved)
    assert json.loads((middle / "state.json").read_text())["run"]["step"] == 3
    resumed = train_prefix(tiny_llama, train, val_data=val,
                           config=_config(checkpoint_dir=tmp_path / "b", resume_from=middle,
                                          patience=5, reparam=reparam, mlp_hidden=16))
    assert resumed.steps == full.steps == 6
    assert torch.equal(resumed.p_theta, full.p_theta)
    assert resumed.history == full.history
    assert resumed.val_loss == full.val_loss and resumed.best_step == full.best_step
    assert resumed.no_prefix_val_loss == full.no_prefix_val_loss


def test_resume_from_a_checkpoint_dir_uses_its_latest(tiny_llama, tmp_path):
    train = records(YES, prompts(8, seed=1))
    cfg = _config(checkpoint_dir=tmp_path / "c", max_steps=4, checkpoint_every=2,
                  keep_checkpoints=1)
    done = train_prefix(tiny_llama, train, config=cfg)
    assert [p.name for p in (tmp_path / "c").glob("step-*")] == ["step-00000004"]
    again = train_prefix(tiny_llama, train, config=_config(max_steps=4, resume_from=tmp_path / "c"))
    assert again.steps == 4 and torch.equal(again.p_theta, done.p_theta)


def test_resume_refuses_other_data_or_another_prefix_shape(tiny_llama, tmp_path):
    train = records(YES, prompts(8, seed=1))
    train_prefix(tiny_llama, train, config=_config(checkpoint_dir=tmp_path, max_steps=3))
    with pytest.raises(CheckpointError, match="data_digest"):
        train_prefix(tiny_llama, records(NO, prompts(8, seed=1)),
                     config=_config(resume_from=tmp_path))
    with pytest.raises(CheckpointError, match="prefix"):
        train_prefix(tiny_llama, train, config=_config(resume_from=tmp_path, prefix_len=5))
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        train_prefix(tiny_llama, train, config=_config(resume_from=tmp_path / "missing"))
