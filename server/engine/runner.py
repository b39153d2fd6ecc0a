"""Batch -> tensors (ids, positions, additive mask) -> the model's own forward -> logits.

The model runs with the pool's `SlotCache`: each forward writes its new K/V in place into the
pool and attends over a view of it. The runner builds, per forward, an explicit additive 4D mask
`[rows, 1, q_len, width]` (0 where visible, finfo.min elsewhere; a boolean 4D mask is silently
wrong with eager attention) and explicit position ids (= slot columns), so rows with different
prefix and prompt lengths share one batch.
"""

from __future__ import annotations

import torch

from server.engine.kv_pool import KVPool
from server.engine.scheduler import PrefillChunk, StepPlan


class Runner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device) -> None:
        self.model, self.pool, self.device = model, pool, device
        self.neg = torch.finfo(pool.keys.dtype).min  # the "invisible" additive mask value
        self.dtype = pool.keys.dtype

    @torch.no_grad()
    def decode(self, plan: StepPlan) -> torch.Tensor:
        """One token for each of `plan.decode` over pool rows [0, num_rows).

        Returns float32 logits [len(plan.decode), vocab] in `plan.decode` order. Rows that are
        not decoding (still prefilling) are fully masked and write to the scratch column.
        """
        n, scratch = plan.num_rows, self.pool.scratch_column
        ids, cols, seen = [0] * n, [scratch] * n, [-1] * n  # per pool row
        for request in plan.decode:
            s = request.slot
            ids[s], cols[s] = request.output_ids[-1], request.num_computed
            seen[s] = request.num_computed  # the new token sees columns [0, num_computed]
        width = max(seen) + 1
        visible = torch.tensor(seen, device=self.device)
        positions = visible.clamp(min=0)[:, None]  # [n, 1]; idle rows use position 0
        mask = self._mask(torch.arange(width, device=self.device)[None, :] <= visible[:, None])
        self.pool.cache.bind_decode(
            torch.arange(n, device=self.device), torch.tensor(cols, device=self.device), width
        )
        logits = self._forward(torch.tensor(ids, device=self.device)[:, None], positions, mask)
        rows = torch.tensor([r.slot for r in plan.decode], device=self.device)
        return logits[rows, -1].float()

    @torch.no_grad()
    def prefill(self, chunk: PrefillChunk) -> torch.Tensor:
        """Compute one chunk of a prompt into its slot; float32 logits [vocab] of its last token."""
        request, start, length = chunk.request, chunk.start, chunk.length
        offset = start - request.prefix_len
        ids = torch.tensor([request.prompt_ids[offset : offset + length]], device=self.device)
        positions = torch.arange(start, start + length, device=self.device)  # [q]
        keys = torch.arange(start + length, device=self.device)  # [width]
        mask = self._mask((keys[None, :] <= positions[:, None])[None])  # [1, 1, q, width]
        self.pool.cache.bind_prefill(request.slot, start, length)
        return self._forward(ids, positions[None, :], mask)[0, -1].float()

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        """bool [rows, q, width] or [rows, width] -> additive [rows, 1, q, width] in model dtype."""
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        additive = torch.where(visible, zero, self.neg)
        return additive[:, None, None, :] if additive.dim() == 2 else additive[:, None]

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """ids/positions [rows, q], mask [rows, 1, q, width] -> logits [rows, 1, vocab]."""
        out = self.model(
            input_ids=ids, position_ids=positions, attention_mask=mask,
            cache=self.pool.cache, use_cache=True, logits_to_keep=1,
        )
        return out.logits
