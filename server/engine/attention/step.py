"""One step's attention state, handed to every layer through the forward's `paged` argument."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from server.engine.attention.layout import StepLayout, flat, token_rows

if TYPE_CHECKING:
    from server.engine.attention.backends import AttentionBackend
    from server.engine.kv_pool import KVPool


class StepAttention:
    """Where this step's new keys/values go, and the backend's metadata to read them back.

    Built once per step by the runner; each layer's call writes that layer's new K/V into the
    pool and returns the attention output of every packed token.
    """

    def __init__(
        self, pool: KVPool, backend: AttentionBackend, layout: StepLayout, device: torch.device
    ) -> None:
        bs = layout.block_size
        row, own = token_rows(layout)  # [T] each
        tables = [r.own_blocks for r in layout.rows]
        first = torch.tensor([0, *itertools.accumulate(len(t) for t in tables)][:-1])
        blocks = flat(tables)[first[row] + own // bs]
        slots = torch.stack([blocks, own % bs]).to(device, non_blocking=True)
        self.slot_block, self.slot_offset = slots[0], slots[1]  # [T] each: where token t goes
        self.pool, self.backend = pool, backend
        self.meta = backend.prepare(layout, device)

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """query [1, H, T, hd], key/value [1, H_kv, T, hd] -> attention output [1, T, H, hd]."""
        k_pool, v_pool = self.pool.keys[layer], self.pool.values[layer]  # [blocks, H_kv, bs, hd]
        k_pool[self.slot_block, :, self.slot_offset] = key[0].transpose(0, 1)
        v_pool[self.slot_block, :, self.slot_offset] = value[0].transpose(0, 1)
        out = self.backend.attend(query[0].transpose(0, 1), k_pool, v_pool, self.meta, scale)
        return out[None]
