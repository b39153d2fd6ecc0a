"""Sizing the KV pool from memory: how many blocks, and what one request may use.

By default the pool takes a share of the memory left once the model is loaded:
- CUDA: like vLLM's `gpu_memory_utilization`, the process may use that share (0.9) of the
  device's memory; the pool gets what is left of it after the weights, whatever else already uses
  the device, and the activations of one full step (measured by a forward at startup).
- CPU: `cpu_kv_fraction` (0.5) of the RAM the system reports available after loading.
`kv_cache_bytes` (`--kv-cache-mb`) overrides both. The pool never exceeds what `max_batch_size`
requests at full length could use, so small models do not claim memory they can never fill.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.attention.backends import AttentionBackend, choose_backend
from server.engine.config import EngineConfig, MiB
from server.engine.kv_pool import KVShape
from server.models.loader import LoadedModel


@dataclass(frozen=True)
class PoolPlan:
    shape: KVShape
    num_blocks: int
    watermark_blocks: int  # kept free at admission, so running requests can grow
    max_seq_len: int  # prefix + prompt + output, per request
    bytes_per_block: int
    source: str  # how the size was chosen (for the startup log)
    backend: AttentionBackend

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.shape.block_size)

    def describe(self) -> str:
        tokens = self.num_blocks * self.shape.block_size
        mib = self.num_blocks * self.bytes_per_block / MiB
        return (
            f"{self.num_blocks} blocks of {self.shape.block_size} tokens = {tokens} tokens, "
            f"{mib:.1f} MiB ({self.source}); up to {self.max_seq_len} tokens per request; "
            f"attention backend {self.backend.name}"
        )


def plan_pool(
    loaded: LoadedModel, config: EngineConfig, *,
    available_ram: Callable[[], int] | None = None,
) -> PoolPlan:
    """The pool's shape and size for `loaded` under `config`; ValueError (naming the flags to
    change) when it cannot hold one request of `max_seq_len` tokens. `available_ram` gives the
    RAM a CPU pool takes its share of (default: what the system reports now)."""
    _refuse_sliding_window(loaded)
    max_seq_len = config.max_seq_len or loaded.max_context
    if max_seq_len > loaded.max_context:
        raise ValueError(
            f"--max-seq-len {max_seq_len} exceeds the model's context of {loaded.max_context} "
            "tokens"
        )
    fp = loaded.fingerprint
    shape = KVShape(fp.num_layers, fp.num_kv_heads, fp.head_dim, config.block_size)
    per_block = shape.bytes_per_block(loaded.dtype)
    budget, source = _budget(loaded, config, available_ram or system_available_ram)
    # A request's prefix and own tokens start in separate blocks: one extra block at most.
    per_request = -(-max_seq_len // config.block_size) + 1
    num_blocks = min(budget // per_block, per_request * config.max_batch_size)
    if num_blocks < per_request:
        raise ValueError(
            f"the KV pool ({source}) holds {max(num_blocks, 0) * config.block_size} tokens, but "
            f"one request of up to {max_seq_len} tokens needs {per_request * per_block} bytes "
            f"({per_request} blocks): raise --kv-cache-mb (PREFIX_SERVE_KV_CACHE_MB) or lower "
            "--max-seq-len (PREFIX_SERVE_MAX_SEQ_LEN)"
        )
    return PoolPlan(
        shape, num_blocks, max(1, num_blocks // 100), max_seq_len, per_block, source,
        choose_backend(config.attention_backend, loaded.device),
    )


def _budget(
    loaded: LoadedModel, config: EngineConfig, available_ram: Callable[[], int]
) -> tuple[int, str]:
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes, f"--kv-cache-mb {config.kv_cache_bytes / MiB:.3g}"
    if loaded.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(loaded.device)
        activations = _step_activation_bytes(loaded, config.max_num_batched_tokens,
                                             config.max_batch_size)
        share = config.gpu_memory_utilization
        budget = int(share * total) - (total - free) - activations
        return budget, (
            f"--gpu-memory-utilization {share:g} of {total / 2**30:.1f} GiB, after "
            f"{(total - free) / 2**30:.1f} GiB in use and {activations / 2**30:.2f} GiB for a "
            "step's activations"
        )
    available = available_ram()
    share = config.cpu_kv_fraction
    return int(share * available), (
        f"--cpu-kv-fraction {share:g} of {available / 2**30:.1f} GiB available RAM"
    )


def _step_activation_bytes(loaded: LoadedModel, tokens: int, samplers: int) -> int:
    """Peak memory of one forward of `tokens` tokens (CUDA), measured once at startup."""
    device = loaded.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    with torch.no_grad():
        loaded.model(input_ids=ids, use_cache=False, logits_to_keep=min(tokens, samplers))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak


def system_available_ram() -> int:
    """Bytes of RAM the system reports available (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _refuse_sliding_window(loaded: LoadedModel) -> None:
    # Paged attention reads every cached key of a row, so a sliding-window layer would silently
    # attend to its whole past.
    layer_types = getattr(loaded.model.config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        raise ValueError("models with sliding-window attention layers are not supported")
