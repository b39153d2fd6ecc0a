"""How long a run is and what learning rate each optimizer step uses.

The micro-batches of all epochs form one stream (epoch e's batches come from a permutation seeded
by (seed, e)); optimizer step s consumes micro-batches [s * grad_accum, (s + 1) * grad_accum).
So the step number alone says where the run is, which is what makes resume exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.training.config import TrainConfig


@dataclass(frozen=True)
class Plan:
    micro_per_epoch: int  # micro-batches in one pass over the training data
    total_steps: int  # optimizer steps of the whole run
    warmup_steps: int
    eval_every: int  # optimizer steps between validations
    accum: int  # micro-batches per optimizer step

    def micro_batch(self, index: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global micro-batch `index`."""
        return divmod(index, self.micro_per_epoch)

    def epochs_done(self, step: int) -> float:
        return step * self.accum / self.micro_per_epoch


def make_plan(num_train: int, config: TrainConfig) -> Plan:
    micro = math.ceil(num_train / config.batch_size)
    per_epoch = max(1, math.ceil(micro / config.grad_accum))
    total = config.max_steps or math.ceil(config.epochs * micro / config.grad_accum)
    warmup = config.warmup_steps or int(config.warmup_ratio * total)
    return Plan(
        micro_per_epoch=micro,
        total_steps=total,
        warmup_steps=min(warmup, total),
        eval_every=config.eval_every or per_epoch,
        accum=config.grad_accum,
    )


def lr_factor(step: int, plan: Plan, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR for 0-based optimizer step `step`.

    Linear warm-up from lr / warmup to lr over `warmup_steps`, then cosine or linear decay to
    `lr * min_ratio` at the last step (or constant).
    """
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, plan.total_steps - plan.warmup_steps - 1)
    progress = min(1.0, (step - plan.warmup_steps) / decay_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape
