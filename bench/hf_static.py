"""The baseline: one static batch through the model's own code and cache, no server, no engine.

Each row's prefix goes in as past keys/values (as `server.models.prefix_kv.forward_with_prefix`
does for one prefix): the rows' prefixes, left-padded to the longest, form a DynamicCache; the
prompts, left-padded to the longest, are prefilled in one forward with a 2D mask over
[cache + prompt] and per-row position ids (text starts at the row's prefix length); then batched
greedy decode, one token per row per forward, through the same cache.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from bench.common import Workload


@dataclass
class StaticResult:
    tokens: int
    wall_s: float
    prefill_s: float  # every row's first token comes at the end of the prefill (its TTFT)
    decode_s: float
    outputs: list[list[int]]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def decode_step_ms(self) -> float:
        steps = len(self.outputs[0]) - 1 if self.outputs else 0
        return 1000 * self.decode_s / max(1, steps)

    def summary(self) -> dict[str, float]:
        return {"tokens": self.tokens, "wall_s": self.wall_s, "tok_s": self.tok_s,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_step_ms": self.decode_step_ms}


@torch.no_grad()
def static_batch(model: PreTrainedModel, workload: Workload,
                 prefixes: list[dict[str, torch.Tensor]]) -> StaticResult:
    """Greedy-generate `workload.new_tokens` for every row, all rows as one batch.

    `prefixes` holds {"keys", "values"} ([L, H_kv, P, hd]) per prefix index of the rows."""
    device = next(model.parameters()).device
    rows, new_tokens = workload.rows, workload.new_tokens
    start = _clock(device)
    cache, cache_mask, prefix_lens = _prefix_cache(model, workload, prefixes)
    ids, text_mask = _left_padded([r.prompt for r in rows], device)
    positions = (text_mask.cumsum(-1) - 1).clamp(min=0) + prefix_lens[:, None]  # [B, S]
    mask = torch.cat([cache_mask, text_mask], dim=1)  # [B, P + S]
    logits = _forward(model, ids, mask, positions, cache)
    tokens = [logits.argmax(-1)]  # [B] each
    last = positions[:, -1]
    prefill_end = _clock(device)
    for _ in range(new_tokens - 1):
        last = last + 1
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = _forward(model, tokens[-1][:, None], mask, last[:, None], cache)
        tokens.append(logits.argmax(-1))
    outputs = torch.stack(tokens, dim=1).tolist()  # one host sync for the whole run
    end = _clock(device)
    return StaticResult(len(rows) * new_tokens, end - start, prefill_end - start,
                        end - prefill_end, outputs)


def _forward(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor,
             positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Last-position logits [B, vocab]; the cache grows in place."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{_cache_argument(model): cache})
    logits: torch.Tensor = out.logits[:, -1]
    return logits


def _cache_argument(model: PreTrainedModel) -> str:
    # transformers renamed `past_key_values` to `cache` (5.24 takes `cache`; 5.17 the old name).
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _prefix_cache(model: PreTrainedModel, workload: Workload,
                  prefixes: list[dict[str, torch.Tensor]]
                  ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """The rows' prefixes left-padded into one cache; its mask [B, P_max] and lengths [B]."""
    param = next(model.parameters())
    rows = workload.rows
    lengths = [prefixes[r.prefix]["keys"].shape[2] if r.prefix >= 0 else 0 for r in rows]
    width = max(lengths)
    prefix_lens = torch.tensor(lengths, device=param.device)
    if width == 0:
        empty = torch.zeros(len(rows), 0, dtype=torch.long, device=param.device)
        return DynamicCache(), empty, prefix_lens
    layers, heads, _, head_dim = prefixes[0]["keys"].shape
    keys = torch.zeros((layers, len(rows), heads, width, head_dim), dtype=param.dtype,
                       device=param.device)  # [L, B, H_kv, P_max, hd]
    values = torch.zeros_like(keys)
    for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        if length:
            prefix = prefixes[row.prefix]
            keys[:, i, :, width - length:] = prefix["keys"].to(keys)
            values[:, i, :, width - length:] = prefix["values"].to(values)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=param.device)
    for i, length in enumerate(lengths):
        mask[i, width - length:] = 1
    cache = DynamicCache(ddp_cache_data=list(zip(keys.unbind(0), values.unbind(0), strict=True)))
    return cache, mask, prefix_lens


def _left_padded(prompts: list[list[int]], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, S_max] (pad 0) and their mask [B, S_max], real tokens on the right."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
