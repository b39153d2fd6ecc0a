"""The engine's configuration, its stats snapshot, and the wait-queue policy it names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.engine.fairness import Policy, WaitQueue, make_wait_queue

MiB = 2**20


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 256  # most requests running at once
    max_queue: int = 1024  # most requests waiting to be admitted; beyond it submit is refused
    max_num_batched_tokens: int = 2048  # tokens per step: decode rows plus prompt chunks
    block_size: int = 16  # token slots per KV block
    admission_lookahead_tokens: int = 64  # growth kept free per running request (scheduler.py)
    kv_cache_bytes: int | None = None  # KV pool size; None = a share of the free memory
    gpu_memory_utilization: float = 0.9  # CUDA: share of the device's memory the process may use
    cpu_kv_fraction: float = 0.5  # CPU: share of the RAM available after loading, for the pool
    max_seq_len: int | None = None  # prefix + prompt + output per request; None = model's context
    attention_backend: Literal["auto", "torch"] = "auto"
    output_thread: Literal["auto", "on", "off"] = "auto"  # detokenize on a thread (output.py)
    fairness: Policy = "vtc"  # waiting-queue policy: "vtc" (token-fair between tenants) or "fifo"
    fair_prompt_weight: float = 1.0  # service charged per prompt token (fairness.PROMPT_WEIGHT)
    fair_output_weight: float = 2.0  # service charged per generated token (fairness.OUTPUT_WEIGHT)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_batch_size ({self.max_batch_size}): every running request decodes each step"
            )
        if self.max_queue < 0 or self.admission_lookahead_tokens < 0:
            raise ValueError("EngineConfig.max_queue and admission_lookahead_tokens must be >= 0")
        if not 0 < self.gpu_memory_utilization <= 1 or not 0 < self.cpu_kv_fraction <= 1:
            raise ValueError("gpu_memory_utilization and cpu_kv_fraction must be in (0, 1]")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError("EngineConfig.max_seq_len must be >= 2")


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests holding KV blocks
    waiting: int  # requests queued for admission (new or preempted)
    tokens_generated: int
    prefix_cache_hits: int  # admissions whose prefix K/V were already in the pool
    prefix_cache_misses: int
    prefix_cache_evictions: int  # idle cached prefixes whose blocks were reclaimed
    prefix_cache_bytes: int  # pool bytes holding prefix K/V (held or idle)
    prefix_cache_entries: int
    steps: int
    busy_s: float = 0.0  # wall time inside steps that ran the model
    forward_s: float = 0.0  # of which: the model's forward and sampling (tokens on the host)
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0  # held by running requests or by prefixes they use
    kv_blocks_prefix: int = 0  # holding prefix K/V (held or idle cached)
    kv_block_size: int = 0
    kv_cache_bytes: int = 0
    preemptions: int = 0
    tenant_service: dict[str, float] = field(default_factory=dict)  # fairness counters
    tenant_preemptions: dict[str, int] = field(default_factory=dict)  # tenant -> preempted


def make_queue(config: EngineConfig) -> WaitQueue:
    return make_wait_queue(config.fairness, config.fair_prompt_weight, config.fair_output_weight)
