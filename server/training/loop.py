"""`train_prefix`: the training loop of Prefix-Tuning on a frozen base model.

Each optimizer step: P_theta (directly or from the MLP) -> `kv_from_p_theta` (each layer's frozen
W_k / W_v) -> the model's own forward with those K/V as past (`forward_with_prefix`) -> masked
cross-entropy on the loss-bearing tokens -> AdamW on the prefix parameters only. The base model's
weights never require grad and are never handed to the optimizer.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from server.models.loader import LoadedModel, load_model
from server.training import checkpoint as ckpt
from server.training.config import EvalRecord, TrainConfig, TrainConfigError, TrainResult
from server.training.data import (
    Batch,
    DataSource,
    EncodeOptions,
    TrainingData,
    collate,
    epoch_order,
    eval_batches,
    prepare,
)
from server.training.objective import (
    autocast,
    autocast_dtype,
    masked_nll_sum,
    mean_loss,
    prefix_logits,
)
from server.training.prefix import PrefixModule, build_prefix, export_p_theta
from server.training.schedule import lr_factor, make_plan


def train_prefix(
    model_or_loaded: LoadedModel | str | Path,
    train_data: DataSource,
    *,
    config: TrainConfig | None = None,
    val_data: DataSource | None = None,
) -> TrainResult:
    """Train one prefix on `train_data` for a frozen model.

    Args:
        model_or_loaded: a `LoadedModel`, or a model id / directory loaded with `config.dtype`
            and `config.device`.
        train_data: a JSONL path or an iterable of `{"prompt", "response"}` / `{"text"}` records.
        config: the run's options (defaults: `TrainConfig()`).
        val_data: validation data; without it `config.val_fraction` of `train_data` is held out.
    Returns:
        the trained P_theta [L, T, d_model] (the best-validated state when there is validation
        data) and the run's numbers.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    loaded = _resolve_model(model_or_loaded, config)
    data = prepare(
        train_data, val_data, loaded.tokenizer, _encode_options(loaded, config),
        val_fraction=config.val_fraction, seed=config.seed,
    )
    if config.patience and not data.val:
        raise TrainConfigError(
            "early stopping (patience) needs validation data: pass val data or a val_fraction"
        )
    return Trainer(loaded, data, config).run(started)


class Trainer:
    """One run's moving parts: the prefix, its optimizer, the data and the run's state."""

    def __init__(self, loaded: LoadedModel, data: TrainingData, config: TrainConfig) -> None:
        torch.manual_seed(config.seed)
        self.loaded, self.data, self.config = loaded, data, config
        self.device = loaded.device
        self.prefix: PrefixModule = build_prefix(
            loaded.model, loaded.tokenizer, loaded.fingerprint.num_layers, config
        ).to(self.device)
        # Only the prefix's parameters are ever optimised; the base model stays frozen.
        self.optimizer = torch.optim.AdamW(
            self.prefix.parameters(), lr=config.lr, betas=config.betas,
            weight_decay=config.weight_decay,
        )
        fp16 = autocast_dtype(self.device, config.precision) == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.plan = make_plan(len(data.train), config)
        self.val_batches = eval_batches(data.val, config.batch_size, data.pad_id)
        self.state = ckpt.RunState()
        self._orders: dict[int, list[list[int]]] = {}

    # ---- the run -----------------------------------------------------------------------------

    def run(self, started: float | None = None) -> TrainResult:
        """Train (resuming if configured) and return the result; `started`: the call's start
        time (perf_counter), for the reported wall time."""
        started = time.perf_counter() if started is None else started
        if self.config.resume_from is not None:
            self._resume(self.config.resume_from)
        else:
            self._baselines()
        with tqdm(total=self.plan.total_steps, initial=self.state.step, unit="step",
                  disable=not self.config.progress, dynamic_ncols=True) as bar:
            while self.state.step < self.plan.total_steps and not self.state.stopped_early:
                self._step()
                self._after_step(bar)
        if self.config.checkpoint_dir is not None:
            self._checkpoint()
        return self._result(time.perf_counter() - started)

    def _step(self) -> None:
        """One optimizer step over `grad_accum` micro-batches, weighted by loss-bearing tokens."""
        step_start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * lr_factor(
                self.state.step, self.plan, self.config.schedule, self.config.min_lr_ratio)
        batches = self.micro_batches(self.state.step)
        total_labels = sum(b.num_labels for b in batches)
        loss_sum = sum(self._backward(b, total_labels) for b in batches)
        self._optimizer_step()
        state = self.state
        state.step += 1
        state.window_loss += loss_sum / total_labels
        state.window_steps += 1
        state.train_tokens += total_labels
        state.processed_tokens += sum(b.num_tokens for b in batches)
        state.train_time_s += time.perf_counter() - step_start

    def _backward(self, batch: Batch, total_labels: int) -> float:
        """Backprop one micro-batch's share of the step's mean loss; returns its summed loss."""
        batch = batch.to(self.device)
        with autocast(self.device, self.config.precision):
            logits = prefix_logits(self.loaded, self.prefix(), batch)  # [B, S, vocab]
        nll = masked_nll_sum(logits, batch.labels)
        self.scaler.scale(nll / total_labels).backward()
        return float(nll.detach())

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.prefix.parameters(), self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def micro_batches(self, step: int) -> list[Batch]:
        """The `grad_accum` micro-batches of optimiser step `step` (a pure function of the data,
        the batch size and the seed, so a resumed run sees the same batches)."""
        accum = self.config.grad_accum
        batches = []
        for index in range(step * accum, (step + 1) * accum):
            epoch, position = self.plan.micro_batch(index)
            if epoch not in self._orders:
                self._orders = {epoch: epoch_order(
                    len(self.data.train), self.config.batch_size, self.config.seed, epoch)}
            rows = [self.data.train[i] for i in self._orders[epoch][position]]
            batches.append(collate(rows, self.data.pad_id))
        return batches

    def _after_step(self, bar: tqdm) -> None:
        step, plan = self.state.step, self.plan
        if step % plan.eval_every == 0 or step == plan.total_steps:
            self._evaluate()
        every = self.config.checkpoint_every
        if self.config.checkpoint_dir is not None and every and step % every == 0:
            self._checkpoint()
        bar.update(1)
        bar.set_postfix(self._postfix(), refresh=False)

    # ---- validation and early stopping ---------------------------------------------------------

    def _evaluate(self) -> None:
        state = self.state
        train_loss = state.window_loss / max(state.window_steps, 1)
        val = self._val_loss() if self.val_batches else None
        state.history.append(EvalRecord(step=state.step, train_loss=train_loss, val_loss=val))
        state.last_train_loss, state.window_loss, state.window_steps = train_loss, 0.0, 0
        if val is None:
            return
        if state.best_val is None or val < state.best_val - self.config.min_delta:
            state.best_val, state.best_step, state.bad_evals = val, state.step, 0
            state.best_state = {k: v.detach().clone().cpu()
                                for k, v in self.prefix.state_dict().items()}
        else:
            state.bad_evals += 1
            patience = self.config.patience
            state.stopped_early = bool(patience) and state.bad_evals >= patience

    def _val_loss(self, with_prefix: bool = True) -> float:
        with torch.no_grad():
            p_theta = self.prefix() if with_prefix else None
        return mean_loss(self.loaded, p_theta, self.val_batches, self.config.precision)

    def _baselines(self) -> None:
        """Validation loss of the frozen model without a prefix, and with the initial prefix."""
        if self.val_batches:
            self.state.no_prefix_val_loss = self._val_loss(with_prefix=False)
            self.state.initial_val_loss = self._val_loss()

    def _postfix(self) -> dict[str, str]:
        state = self.state
        tps = state.processed_tokens / max(state.train_time_s, 1e-9)
        # the running mean since the last validation (or that validation's, right after it)
        loss = (state.window_loss / state.window_steps if state.window_steps
                else state.last_train_loss or 0.0)
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:.0f}",
                "lr": f"{self.optimizer.param_groups[0]['lr']:.2e}"}
        if state.history and state.history[-1].val_loss is not None:
            post["val"] = f"{state.history[-1].val_loss:.4f}"
        return post

    # ---- checkpoints -------------------------------------------------------------------------

    def _identity(self) -> dict[str, object]:
        """What a checkpoint must match to be resumed by this run."""
        cfg, fp = self.config, self.loaded.fingerprint
        return {
            "model_digest": fp.digest, "data_digest": self.data.digest,
            "prefix": {"prefix_len": cfg.prefix_len, "reparam": cfg.reparam,
                       "mlp_hidden": cfg.mlp_hidden if cfg.reparam == "mlp" else None,
                       "num_layers": fp.num_layers, "d_model": fp.hidden_size},
            "batching": {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                         "seed": cfg.seed},
        }

    def _checkpoint(self) -> None:
        assert self.config.checkpoint_dir is not None
        plan = self.plan
        extra = {
            **self._identity(),
            "scheduler": {"schedule": self.config.schedule, "total_steps": plan.total_steps,
                          "warmup_steps": plan.warmup_steps, "step": self.state.step},
            "scaler": self.scaler.state_dict(),
            "config": self.config.to_dict(),
        }
        ckpt.save_checkpoint(self.config.checkpoint_dir, self.prefix, self.optimizer,
                             self.state, extra, self.config.keep_checkpoints)

    def _resume(self, path: Path) -> None:
        tensors, payload = ckpt.load_checkpoint(path)
        ckpt.check_compatible(payload, self._identity())
        self.state = ckpt.restore(tensors, payload, self.prefix, self.optimizer)
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])

    # ---- the result --------------------------------------------------------------------------

    def _result(self, wall_s: float) -> TrainResult:
        state = self.state
        if state.best_state is not None:
            self.prefix.load_state_dict(state.best_state)  # export the best-validated prefix
        return TrainResult(
            p_theta=export_p_theta(self.prefix), steps=state.step,
            epochs=self.plan.epochs_done(state.step), train_loss=state.last_train_loss,
            val_loss=state.best_val, no_prefix_val_loss=state.no_prefix_val_loss,
            initial_val_loss=state.initial_val_loss, best_step=state.best_step,
            stopped_early=state.stopped_early, elapsed_s=wall_s,
            train_tokens=state.train_tokens,
            tokens_per_s=state.processed_tokens / max(state.train_time_s, 1e-9),
            num_train=len(self.data.train), num_val=len(self.data.val),
            dropped=self.data.dropped, init=self.config.init, reparam=self.config.reparam,
            history=list(state.history), config=self.config,
        )


def _resolve_model(model_or_loaded: LoadedModel | str | Path, config: TrainConfig) -> LoadedModel:
    if isinstance(model_or_loaded, LoadedModel):
        loaded = model_or_loaded
    else:
        loaded = load_model(str(model_or_loaded), dtype=config.dtype, device=config.device)
    loaded.model.requires_grad_(False)  # frozen, whatever the caller did to it
    loaded.model.eval()
    return loaded


def _encode_options(loaded: LoadedModel, config: TrainConfig) -> EncodeOptions:
    # The prefix takes positions 0..T-1, so the text gets what is left of the context.
    room = loaded.max_context - config.prefix_len
    if room < 2:
        raise TrainConfigError(
            f"prefix_len {config.prefix_len} leaves {room} positions of the model's context "
            f"({loaded.max_context}); use a shorter prefix"
        )
    return EncodeOptions(max_length=min(config.max_length, room),
                         chat_template=config.chat_template, append_eos=config.append_eos)
