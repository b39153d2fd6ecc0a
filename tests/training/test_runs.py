"""Whole runs: early stopping keeps the best prefix; text records; bf16 autocast; progress."""

from __future__ import annotations

import json

import pytest
import torch

from server.training.config import TrainConfig, TrainConfigError
from server.training.data import EncodeOptions, eval_batches, prepare
from server.training.loop import train_prefix
from server.training.objective import mean_loss
from tests.training.tasks import NO, YES, prompts, records


def _val_loss(loaded, p_theta, rows) -> float:
    data = prepare(rows, None, loaded.tokenizer, EncodeOptions(256), val_fraction=0, seed=0)
    return mean_loss(loaded, p_theta, eval_batches(data.train, 8, data.pad_id))


def test_early_stopping_stops_and_keeps_the_best_validated_prefix(tiny_llama):
    # Training towards "yes" while validating on "no": the val loss soon rises and stays up.
    train, val = records(YES, prompts(16, seed=1)), records(NO, prompts(8, seed=2))
    cfg = TrainConfig(prefix_len=4, epochs=0, max_steps=60, batch_size=4, lr=0.3,
                      schedule="constant", eval_every=2, patience=3, init="random",
                      progress=False)
    result = train_prefix(tiny_llama, train, val_data=val, config=cfg)
    assert result.stopped_early and result.steps < 60
    vals = [h.val_loss for h in result.history]
    best = min(v for v in vals if v is not None)
    assert result.val_loss == best and result.history[vals.index(best)].step == result.best_step
    assert result.steps == result.best_step + 3 * 2  # three validations without improvement
    # The returned P_theta is the best one, not the last one.
    assert abs(_val_loss(tiny_llama, result.p_theta, val) - best) < 1e-5


def test_text_records_train_on_every_token(tiny_llama):
    rows = [{"text": f"{p} yes yes yes"} for p in prompts(16, seed=3)]
    cfg = TrainConfig(prefix_len=4, epochs=3, batch_size=4, lr=0.1, val_fraction=0.25,
                      init="random", progress=False)
    result = train_prefix(tiny_llama, rows, config=cfg)
    assert result.steps == 9 and (result.num_train, result.num_val) == (12, 4)
    assert result.val_loss is not None and result.initial_val_loss is not None
    assert result.val_loss < result.initial_val_loss


def test_bf16_autocast_trains_a_float32_prefix(tiny_llama):
    cfg = TrainConfig(prefix_len=4, epochs=0, max_steps=8, batch_size=4, lr=0.1,
                      val_fraction=0.25, precision="bf16", progress=False)
    result = train_prefix(tiny_llama, records(YES, prompts(16, seed=4)), config=cfg)
    assert result.p_theta.dtype == torch.float32
    assert result.val_loss is not None and result.initial_val_loss is not None
    assert result.val_loss < result.initial_val_loss


def test_fp16_needs_cuda_and_patience_needs_validation_data(tiny_llama):
    rows = records(YES, prompts(8, seed=5))
    if not torch.cuda.is_available():
        with pytest.raises(TrainConfigError, match="fp16 needs a CUDA device"):
            train_prefix(tiny_llama, rows, config=TrainConfig(precision="fp16", progress=False))
    with pytest.raises(TrainConfigError, match=r"\(patience\) needs validation data"):
        train_prefix(tiny_llama, rows, config=TrainConfig(patience=2, progress=False))


def test_progress_bar_shows_loss_and_tokens_per_second(tiny_llama, capsys):
    cfg = TrainConfig(prefix_len=4, epochs=1, batch_size=4, progress=True)
    result = train_prefix(tiny_llama, records(YES, prompts(8, seed=6)), config=cfg)
    err = capsys.readouterr().err
    assert "2/2" in err and "loss=" in err and "tok/s=" in err
    assert result.tokens_per_s > 0 and "tokens/s" in result.summary()


def test_train_prefix_loads_a_model_path_and_reads_jsonl_files(tiny_model_dir, tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records(YES, prompts(8, seed=7))))
    val.write_text('{"text": "hello world yes"}\n')
    cfg = TrainConfig(prefix_len=3, epochs=1, batch_size=4, device="cpu", progress=False)
    result = train_prefix(tiny_model_dir("llama"), train, val_data=val, config=cfg)
    assert (result.steps, result.num_train, result.num_val) == (2, 8, 1)
    assert result.p_theta.shape == (2, 3, 64)
