"""Plan -> tensors -> the model's own forward, once per step -> logits of the sampled rows.

Every row of the step (decode tokens and prompt chunks of several requests) is packed into one
sequence of `T` tokens: input ids and position ids `[1, T]`, no padding. Attention keeps rows
apart: each row reads only its own blocks (`attention/`). Logits are computed only for the last
token of each row that samples (`logits_to_keep`), so the vocabulary projection costs one row per
sampled request, not one per prompt token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.attention import RowLayout, StepAttention, StepLayout, install
from server.engine.attention.backends import AttentionBackend
from server.engine.kv_pool import KVPool
from server.engine.scheduler import Work
from server.models.loader import LoadedModel


class Runner:
    def __init__(self, loaded: LoadedModel, pool: KVPool, backend: AttentionBackend) -> None:
        self.model, self.device = loaded.model, loaded.device
        self.pool, self.backend = pool, backend
        install(self.model)
        # A 4D mask is taken as given, so the model builds none of its own; attention ignores it.
        self._no_mask = torch.zeros(1, 1, 1, 1, dtype=loaded.dtype, device=self.device)

    @torch.no_grad()
    def run(self, work: Sequence[Work]) -> torch.Tensor:
        """Compute `work`'s tokens into the pool. Returns float32 logits [samplers, vocab], one
        row for each work item that samples, in `work` order. Reads only the plan's plain data
        (ids, positions, block ids), never a request."""
        ids: list[int] = []
        positions: list[int] = []
        rows: list[RowLayout] = []
        keep: list[int] = []
        for item in work:
            start, length = item.start, item.length
            first = item.prefix_len + start
            rows.append(RowLayout(
                query_start=len(ids), query_len=length, own_start=start,
                own_blocks=list(item.blocks), prefix_blocks=list(item.prefix_blocks),
                prefix_len=item.prefix_len,
            ))
            ids.extend(item.token_ids)
            positions.extend(range(first, first + length))
            if item.samples:
                keep.append(len(ids) - 1)
        host = torch.tensor([ids, positions], dtype=torch.long)
        inputs = host.to(self.device, non_blocking=True)
        step = StepAttention(self.pool, self.backend, StepLayout(self.pool.shape.block_size,
                                                                 rows, len(ids)), self.device)
        out = self.model(
            input_ids=inputs[0][None], position_ids=inputs[1][None], attention_mask=self._no_mask,
            paged=step, use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
        )
        return out.logits[0].float()  # [samplers, vocab]
