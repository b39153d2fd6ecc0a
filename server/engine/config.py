"""The engine's configuration and its stats snapshot; sizing the KV pool from the config."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.kv_pool import KVPool, PoolShape
from server.models.loader import LoadedModel

MiB = 2**20
DEFAULT_MAX_SEQ_LEN = 4096


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # most requests running at once (KV slots)
    max_queue: int = 256  # most requests waiting for a slot; beyond it submit is refused
    kv_cache_bytes: int | None = None  # KV pool budget; None = max_batch_size slots
    max_seq_len: int | None = None  # slot length; None = min(model max_context, 4096)
    prefix_cache_bytes: int = 256 * MiB  # device bytes for cached prefix K/V (LRU)
    prefill_chunk_tokens: int = 256  # prompt tokens prefilled per step, across requests
    record_logits: bool = False  # keep each request's first-step logits (tests)
    fairness: str = "vtc"  # waiting-queue policy: "vtc" (token-fair between tenants) or "fifo"
    fair_prompt_weight: float = 1.0  # service charged per prompt token (fairness.PROMPT_WEIGHT)
    fair_output_weight: float = 2.0  # service charged per generated token (fairness.OUTPUT_WEIGHT)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "prefill_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.max_queue < 0 or self.prefix_cache_bytes < 0:
            raise ValueError("EngineConfig.max_queue and prefix_cache_bytes must be >= 0")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError("EngineConfig.max_seq_len must be >= 2")


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests holding a KV slot
    waiting: int  # requests queued for a slot
    free_slots: int
    total_slots: int
    tokens_generated: int
    prefix_cache_hits: int
    prefix_cache_misses: int
    prefix_cache_evictions: int
    prefix_cache_bytes: int
    prefix_cache_entries: int
    steps: int
    busy_s: float = 0.0  # wall time inside steps that ran the model
    forward_s: float = 0.0  # of which: the model's forward (logits on the host)


def pool_for(loaded: LoadedModel, config: EngineConfig) -> KVPool:
    """Allocate the KV pool: slot length from the config/model, slot count from the budget."""
    _refuse_sliding_window(loaded)
    slot_len = config.max_seq_len or min(loaded.max_context, DEFAULT_MAX_SEQ_LEN)
    if slot_len > loaded.max_context:
        raise ValueError(
            f"max_seq_len {slot_len} exceeds the model's context of {loaded.max_context} tokens"
        )
    fp = loaded.fingerprint
    shape = PoolShape(fp.num_layers, fp.num_kv_heads, fp.head_dim, slot_len)
    per_slot = shape.bytes_per_slot(loaded.dtype)
    slots = config.max_batch_size
    if config.kv_cache_bytes is not None:
        slots = min(slots, config.kv_cache_bytes // per_slot)
    if slots < 1:
        raise ValueError(
            f"kv_cache_bytes={config.kv_cache_bytes} holds no slot: one slot of {slot_len} "
            f"tokens needs {per_slot} bytes (lower max_seq_len or raise the budget)"
        )
    return KVPool(shape, slots, loaded.dtype, loaded.device)


def _refuse_sliding_window(loaded: LoadedModel) -> None:
    # The runner's explicit 4D mask is used as given by every layer, so a sliding-window layer
    # would silently attend to its whole past.
    layer_types = getattr(loaded.model.config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        raise ValueError("models with sliding-window attention layers are not supported")
