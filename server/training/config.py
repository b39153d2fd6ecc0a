"""What a training run is asked to do (`TrainConfig`) and what it gives back (`TrainResult`).

One dataclass per concern would be overkill for a single command, so the run's options live in
one validated `TrainConfig`; `prefix-train` builds it from its flags and `train_prefix` takes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only annotations: `prefix-train --help` must not wait for torch
    import torch

INITS = ("words", "random")
REPARAMS = ("none", "mlp")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_INIT_TEXT = "Answer the following request in the expected style:"


class TrainConfigError(ValueError):
    """An option of the run is invalid; the message names it."""


@dataclass(frozen=True)
class TrainConfig:
    # The prefix
    prefix_len: int = 10  # virtual tokens T
    init: str = "words"  # "words" (embeddings of init_text's tokens) | "random" (N(0, init_std))
    init_text: str = DEFAULT_INIT_TEXT
    init_std: float = 0.02
    reparam: str = "none"  # "none" (P_theta itself) | "mlp" (Li & Liang's MLP, collapsed on export)
    mlp_hidden: int = 512
    # The data
    max_length: int = 256  # text tokens per example (prompt + response), longer ones are cut
    chat_template: bool = False  # wrap each prompt as the user turn of the tokenizer's template
    append_eos: bool = True  # end every response with EOS so the prefix learns to stop
    val_fraction: float = 0.0  # held out from the training data when no val data is given
    # The optimisation
    epochs: int = 3
    max_steps: int = 0  # optimizer steps; 0 = epochs * steps per epoch
    batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-2
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # 0 = no clipping
    schedule: str = "cosine"  # decay after warm-up: "cosine" | "linear" | "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    # Evaluation, early stopping, checkpoints
    eval_every: int = 0  # optimizer steps between validations; 0 = once per epoch
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0  # an improvement must lower the val loss by more than this
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume_from: Path | None = None  # a checkpoint directory (or a checkpoint_dir: its latest)
    # Runtime
    seed: int = 0
    precision: str = "auto"  # autocast: "auto" (bf16 on a CUDA device that has it, else fp32)
    dtype: str = "float32"  # the weights' dtype when train_prefix loads the model itself
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        _choice("init", self.init, INITS)
        _choice("reparam", self.reparam, REPARAMS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _positive(prefix_len=self.prefix_len, max_length=self.max_length,
                  batch_size=self.batch_size, grad_accum=self.grad_accum,
                  mlp_hidden=self.mlp_hidden, keep_checkpoints=self.keep_checkpoints)
        _non_negative(epochs=self.epochs, max_steps=self.max_steps, warmup_steps=self.warmup_steps,
                      eval_every=self.eval_every, patience=self.patience,
                      checkpoint_every=self.checkpoint_every, weight_decay=self.weight_decay,
                      max_grad_norm=self.max_grad_norm, min_delta=self.min_delta)
        if self.epochs == 0 and self.max_steps == 0:
            raise TrainConfigError("set epochs or max_steps: both are 0, so nothing would train")
        _in_range("lr", self.lr, 0.0, math.inf, low_open=True)
        _in_range("init_std", self.init_std, 0.0, math.inf, low_open=True)
        _in_range("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        _in_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        _in_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.init == "words" and not self.init_text.strip():
            raise TrainConfigError("init 'words' needs a non-empty init_text")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view (paths as strings), for metadata and checkpoints."""
        data = asdict(self)
        for key in ("checkpoint_dir", "resume_from"):
            data[key] = None if data[key] is None else str(data[key])
        data["betas"] = list(self.betas)
        return data


@dataclass
class EvalRecord:
    step: int
    train_loss: float  # mean over the optimizer steps since the previous validation
    val_loss: float | None


@dataclass
class TrainResult:
    """What a run produced: the prefix in seed form plus the numbers of its summary."""

    p_theta: torch.Tensor  # [L, T, d_model], float32 on CPU (the best validation state)
    steps: int  # optimizer steps taken
    epochs: float  # passes over the training data (fractional when stopped mid-epoch)
    train_loss: float | None  # mean train loss over the last evaluation window
    val_loss: float | None  # the restored (best) prefix's val loss; None without val data
    no_prefix_val_loss: float | None  # the frozen model without any prefix, same val data
    initial_val_loss: float | None  # the prefix at initialisation, same val data
    best_step: int
    stopped_early: bool
    elapsed_s: float  # wall time of this call (model loading and data preparation included)
    train_tokens: int  # loss-bearing tokens seen by the optimizer
    tokens_per_s: float  # all text tokens (prompt + response) processed per second of training
    num_train: int  # examples
    num_val: int
    dropped: int  # examples dropped (no response token left after truncation)
    init: str
    reparam: str
    history: list[EvalRecord] = field(default_factory=list)
    config: TrainConfig = field(default_factory=TrainConfig)

    def summary(self) -> str:
        """The lines printed at the end of a run."""
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        return "\n".join([
            f"steps {self.steps} ({self.epochs:.2f} epochs), best step {self.best_step}"
            + (", stopped early" if self.stopped_early else ""),
            f"train loss {fmt(self.train_loss)}  val loss {fmt(self.val_loss)}  "
            f"(no prefix {fmt(self.no_prefix_val_loss)}, at init {fmt(self.initial_val_loss)})",
            f"time {self.elapsed_s:.1f}s  {self.tokens_per_s:.0f} tokens/s  "
            f"examples {self.num_train} train / {self.num_val} val"
            + (f" ({self.dropped} dropped)" if self.dropped else ""),
        ])

    def training_metadata(self) -> dict[str, Any]:
        """The `training` block of the registry artifact's metadata (JSON-safe)."""
        cfg = self.config
        return {
            "method": "prefix-tuning", "form": "p_theta", "init": self.init,
            "init_text": cfg.init_text if self.init == "words" else None,
            "reparam": self.reparam, "prefix_len": cfg.prefix_len, "steps": self.steps,
            "epochs": round(self.epochs, 4), "train_loss": self.train_loss,
            "val_loss": self.val_loss, "no_prefix_val_loss": self.no_prefix_val_loss,
            "lr": cfg.lr, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "schedule": cfg.schedule, "num_train": self.num_train, "num_val": self.num_val,
            "train_tokens": self.train_tokens, "chat_template": cfg.chat_template,
            "seed": cfg.seed, "elapsed_s": round(self.elapsed_s, 3),
        }


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TrainConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise TrainConfigError(f"{name} must be at least 1; got {value}")


def _non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise TrainConfigError(f"{name} must be >= 0; got {value}")


def _in_range(
    name: str, value: float, low: float, high: float,
    *, low_open: bool = False, high_open: bool = False,
) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isnan(value):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise TrainConfigError(f"{name} must be in {left}{low}, {high}{right}; got {value}")
