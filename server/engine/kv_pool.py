"""The KV pool: every layer's key and value blocks, allocated once on the model's device.

Keys and values are each `[num_layers, num_blocks, kv_heads, block_size, head_dim]` in the model's
dtype: block `b` of layer `l` is `keys[l, b]`, a `[kv_heads, block_size, head_dim]` tile like a
slice of a Hugging Face cache. Which block holds what is the block manager's business
(`block_manager.py`); this module only holds the tensors and writes prefix K/V into them.

The tensors are allocated uninitialised (so a large pool costs no time and, on CPU, no memory
until it is used); blocks are zeroed the first time they are handed out (`prepare`). Attention
never reads a slot its row does not own (it selects, `attention/backends.py`), so this is hygiene,
not what keeps rows apart. The blocks of a request whose output came out non-finite are zeroed
before they are reused (`scrub`): what it wrote never reaches another request's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    block_size: int  # token slots per block

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        return self.bytes_per_token(dtype) * self.block_size


class KVPool:
    def __init__(
        self, shape: KVShape, num_blocks: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape, self.num_blocks, self.dtype = shape, num_blocks, dtype
        size = (shape.num_layers, num_blocks, shape.kv_heads, shape.block_size, shape.head_dim)
        self.keys = torch.empty(size, dtype=dtype, device=device)  # [L, blocks, H_kv, bs, hd]
        self.values = torch.empty(size, dtype=dtype, device=device)
        self._zeroed = 0  # blocks [0, _zeroed) hold finite values

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def prepare(self, high_water: int) -> None:
        """Zero the blocks below `high_water` that were never handed out before (ids are handed
        out lowest first, so the ones ever used are exactly [0, high_water))."""
        if high_water > self._zeroed:
            self.keys[:, self._zeroed : high_water].zero_()
            self.values[:, self._zeroed : high_water].zero_()
            self._zeroed = high_water

    def scrub(self, blocks: list[int]) -> None:
        """Zero `blocks` in every layer (keys and values)."""
        if blocks:
            index = torch.tensor(blocks, device=self.keys.device)
            self.keys.index_fill_(1, index, 0)
            self.values.index_fill_(1, index, 0)

    def write_prefix(self, blocks: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a prefix's K/V (each [L, H_kv, P, hd]) into `blocks` (P tokens, in order)."""
        layers, heads, length, hd = keys.shape
        bs = self.shape.block_size
        padded = len(blocks) * bs  # the last block's unused slots get zeros
        index = torch.tensor(blocks, device=self.keys.device)
        for source, target in ((keys, self.keys), (values, self.values)):
            tiles = torch.zeros(layers, heads, padded, hd, dtype=self.dtype, device=target.device)
            tiles[:, :, :length] = source
            # [L, H, nb * bs, hd] -> [L, nb, H, bs, hd]
            target[:, index] = tiles.view(layers, heads, len(blocks), bs, hd).transpose(1, 2)
