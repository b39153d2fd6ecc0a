"""The learning-rate schedule, the run's length, and option validation."""

from __future__ import annotations

import math

import pytest

from server.training.config import TrainConfig, TrainConfigError
from server.training.schedule import lr_factor, make_plan


def test_plan_counts_steps_from_epochs_batches_and_accumulation():
    plan = make_plan(10, TrainConfig(epochs=3, batch_size=4, grad_accum=2, warmup_ratio=0.2))
    assert plan.micro_per_epoch == 3  # 4 + 4 + 2 examples
    assert plan.total_steps == math.ceil(3 * 3 / 2) == 5
    assert plan.warmup_steps == 1
    assert plan.eval_every == 2  # once per epoch (ceil(3 / 2) optimizer steps)
    assert plan.micro_batch(7) == (2, 1)
    assert make_plan(10, TrainConfig(max_steps=11, batch_size=4)).total_steps == 11


def test_warmup_is_linear_then_cosine_decays_to_the_floor():
    plan = make_plan(8, TrainConfig(max_steps=12, batch_size=1, warmup_steps=4))
    factors = [lr_factor(s, plan, "cosine", 0.1) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    # halfway through the decay the cosine is at the midpoint
    mid = lr_factor(4 + 7 // 2, plan, "cosine", 0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 7)))


def test_linear_and_constant_schedules():
    plan = make_plan(8, TrainConfig(max_steps=5, batch_size=1))
    assert [lr_factor(s, plan, "linear", 0.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert {lr_factor(s, plan, "constant", 0.0) for s in range(5)} == {1.0}


@pytest.mark.parametrize("options, message", [
    ({"init": "zeros"}, "init must be one of words, random"),
    ({"reparam": "lstm"}, "reparam must be one of none, mlp"),
    ({"prefix_len": 0}, "prefix_len must be at least 1"),
    ({"lr": 0.0}, r"lr must be in \(0.0"),
    ({"val_fraction": 1.0}, "val_fraction must be in"),
    ({"epochs": 0, "max_steps": 0}, "nothing would train"),
    ({"grad_accum": 0}, "grad_accum must be at least 1"),
    ({"patience": -1}, "patience must be >= 0"),
    ({"precision": "fp8"}, "precision must be one of"),
])
def test_bad_options_are_refused_with_their_name(options, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**options)
