"""Preallocated per-layer K/V memory for running requests, and the HF `Cache` that writes into it.

One slot per running request: keys and values are each `[num_layers, num_slots, kv_heads,
slot_len + 1, head_dim]`, allocated once. A slot holds `[prefix K/V | prompt | generated]`;
column `c` is the token at position id `c`. The extra last column (`scratch`) absorbs the writes
of rows that sit in the decode batch without decoding (rows still prefilling), so they never
touch a valid column.

Why slots and not pages: the model's own attention (eager/SDPA) wants one contiguous
`[batch, kv_heads, width, head_dim]` tensor per layer. With slots kept compact (rows `[0, n)`,
see the scheduler) that tensor is a free view of the pool; pages would need a gather per layer
per step, which costs as much as rebuilding the cache. The price is internal fragmentation
(each slot is `slot_len` long), bounded by choosing `max_seq_len`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from server.engine.scheduler import Move


@dataclass(frozen=True)
class PoolShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    slot_len: int  # valid columns per slot (prefix + prompt + generated)

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * (self.slot_len + 1) * self.head_dim * itemsize


@dataclass(frozen=True)
class _Binding:
    """What the next forward writes and reads (set by the runner before each forward)."""

    rows: torch.Tensor | None  # decode: [n] pool rows 0..n-1; None for a prefill chunk
    cols: torch.Tensor | None  # decode: [n] column each row writes (scratch for idle rows)
    num_rows: int  # decode: n; prefill: 1
    slot: int  # prefill: the slot; decode: -1
    start: int  # prefill: first column written; decode: unused
    width: int  # columns returned to attention: [0, width)


class KVPool:
    """The K/V buffers plus the operations on whole slots (prefix placement, compaction moves)."""

    def __init__(
        self, shape: PoolShape, num_slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape, self.num_slots = shape, num_slots
        size = (shape.num_layers, num_slots, shape.kv_heads, shape.slot_len + 1, shape.head_dim)
        self.keys = torch.zeros(size, dtype=dtype, device=device)  # [L, slots, H, S+1, hd]
        self.values = torch.zeros(size, dtype=dtype, device=device)
        self.cache = SlotCache(self)

    @property
    def scratch_column(self) -> int:
        return self.shape.slot_len

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def write_prefix(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy a prefix's K/V ([L, H, P, hd] each) into columns [0, P) of `slot`."""
        length = keys.shape[2]
        self.keys[:, slot, :, :length] = keys
        self.values[:, slot, :, :length] = values

    def move(self, move: Move) -> None:
        """Copy a row's filled columns into a hole (all layers at once)."""
        src, dst, n = move.src, move.dst, move.length
        self.keys[:, dst, :, :n] = self.keys[:, src, :, :n]
        self.values[:, dst, :, :n] = self.values[:, src, :, :n]


class SlotCache(Cache):
    """A transformers `Cache` over the pool: `update()` writes the new K/V in place at per-row
    columns and returns a view of the rows being run. Masks and position ids come from the
    runner (an explicit 4D mask makes the model skip its own mask building)."""

    def __init__(self, pool: KVPool) -> None:
        layers: list = [_SlotLayer(pool, i, self) for i in range(pool.shape.num_layers)]
        super().__init__(layers=layers)
        self.binding = _Binding(None, None, 0, -1, 0, 0)

    def bind_decode(self, rows: torch.Tensor, cols: torch.Tensor, width: int) -> None:
        self.binding = _Binding(rows, cols, rows.shape[0], -1, 0, width)

    def bind_prefill(self, slot: int, start: int, length: int) -> None:
        self.binding = _Binding(None, None, 1, slot, start, start + length)


class _SlotLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, pool: KVPool, layer: int, owner: SlotCache) -> None:
        super().__init__()
        self.k: torch.Tensor = pool.keys[layer]  # [slots, H, S+1, hd]
        self.v: torch.Tensor = pool.values[layer]
        self.keys, self.values = self.k, self.v
        self.owner, self.max_len = owner, pool.shape.slot_len
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value_states: [rows, H, q_len, hd] -> views [rows, H, width, hd] of the pool."""
        b, keys, values = self.owner.binding, self.k, self.v
        if b.rows is not None:  # decode: one new column per row, at that row's own offset
            keys[b.rows, :, b.cols] = key_states[:, :, 0]
            values[b.rows, :, b.cols] = value_states[:, :, 0]
            return keys[: b.num_rows, :, : b.width], values[: b.num_rows, :, : b.width]
        keys[b.slot, :, b.start : b.width] = key_states[0]
        values[b.slot, :, b.start : b.width] = value_states[0]
        return keys[b.slot : b.slot + 1, :, : b.width], values[b.slot : b.slot + 1, :, : b.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.binding.width, 0

    def get_seq_length(self) -> int:
        return self.owner.binding.width

    def get_max_length(self) -> int:
        return self.max_len
