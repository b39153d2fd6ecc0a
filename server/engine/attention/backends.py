"""Attention backends: one interface (prepare a step's metadata, then attend per layer).

`TorchPagedAttention` is portable (CPU and CUDA), written with plain tensor operations and
always tested:
- rows with one query token (decoding) are attended *block by block*: every (row, block) pair the
  row reads — its prefix blocks, then its own — is one item; scores of all items come from one
  batched matmul, and a per-row softmax over the items (segment max, exp, segment sums) gives
  each row its output. No row is padded to the longest one, so one long context costs only its
  own blocks.
- rows with several query tokens (prompt chunks), and decode rows that read more than
  `LONG_ROW_BLOCKS` blocks, are attended one at a time: their blocks are gathered into one
  contiguous sequence per KV head and attention runs with a mask for causality and for the
  unused tail of the prefix's last block. (A long row among short ones would otherwise add many
  small items; alone it is one matrix product per head, measured ~2x cheaper here.)
Exact up to floating-point summation order: every row reads exactly its own keys.

KV hygiene, by construction (docs/security.md): a slot a row does not own (the unused tail of a
block, a slot another request wrote before the block was freed) is *selected out*: its score is
-inf and its key/value are replaced by zeros before any product, so whatever it holds (NaN, inf,
another tenant's data) cannot reach the row (a zero weight times NaN would still be NaN). And
every weighted sum of values uses weights that are already normalised (they sum to 1), as flash
attention's online softmax does, so huge but finite values cannot overflow where the softmax
itself would not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from server.engine.attention.layout import RowLayout, StepLayout, flat, segments

LONG_ROW_BLOCKS = 16  # decode rows reading more blocks than this are attended one by one


class AttentionBackend(Protocol):
    name: str

    def prepare(self, layout: StepLayout, device: torch.device) -> object:
        """The step's metadata (tensors on `device`), built once and used by every layer."""
        ...

    def attend(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: object,
        scale: float,
    ) -> torch.Tensor:
        """q [T, H, hd], pools [blocks, H_kv, bs, hd] (this step's K/V already written)
        -> output [T, H, hd]."""
        ...


@dataclass(frozen=True)
class _Singles:
    tokens: torch.Tensor  # [R] packed index of each one-token row's query
    item_row: torch.Tensor  # [N] which row reads block item_block[i]
    item_block: torch.Tensor  # [N]
    item_valid: torch.Tensor  # [N, bs] bool: slots of that block the row sees
    unowned_item: torch.Tensor  # [U] with unowned_slot: the (item, slot) pairs the row does not
    unowned_slot: torch.Tensor  # own (the tail of a segment's last block); their values are zeroed


@dataclass(frozen=True)
class _Chunk:
    """A row attended on its own (a prompt chunk, or a long decode row)."""

    tokens: slice  # the row's queries in the packed batch
    blocks: torch.Tensor  # [nb] its prefix blocks, then its own
    visible: torch.Tensor  # [q, nb * bs] bool
    unowned: tuple[slice, slice]  # slots no query may read: the prefix's and its own block tails


@dataclass(frozen=True)
class _TorchMeta:
    num_tokens: int
    singles: _Singles | None
    chunks: list[_Chunk]


class TorchPagedAttention:
    name = "torch"

    def prepare(self, layout: StepLayout, device: torch.device) -> _TorchMeta:
        bs = layout.block_size
        singles = [r for r in layout.rows if r.query_len == 1 and not _long(r, bs)]
        chunks = [_chunk(r, bs, device) for r in layout.rows if r.query_len > 1 or _long(r, bs)]
        return _TorchMeta(layout.num_tokens, _singles(singles, bs, device), chunks)

    def attend(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: object,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(meta, _TorchMeta)
        if meta.singles is not None and not meta.chunks:
            return _attend_singles(q, k_pool, v_pool, meta.singles, scale)
        out = torch.empty_like(q)
        if meta.singles is not None:
            s = meta.singles
            out[s.tokens] = _attend_singles(q[s.tokens], k_pool, v_pool, s, scale)
        for chunk in meta.chunks:
            out[chunk.tokens] = _attend_chunk(q[chunk.tokens], k_pool, v_pool, chunk, scale)
        return out


def _long(row: RowLayout, bs: int) -> bool:
    """A row that reads many blocks is cheaper attended on its own, as one sequence."""
    return (row.prefix_len + row.own_len) > LONG_ROW_BLOCKS * bs


def _singles(rows: list[RowLayout], bs: int, device: torch.device) -> _Singles | None:
    if not rows:
        return None
    # Two segments of items per row (its prefix blocks, then its own), each `length` tokens.
    tables, lengths = [], []
    for row in rows:
        tables += [row.prefix_blocks[: -(-row.prefix_len // bs)],
                   row.own_blocks[: -(-row.own_len // bs)]]
        lengths += [row.prefix_len, row.own_len]
    segment, within = segments([len(t) for t in tables])
    count = (torch.tensor(lengths)[segment] - within * bs).clamp(max=bs)
    host = torch.stack([segment // 2, flat(tables), count])  # row, block, visible slots
    items = host.to(device, non_blocking=True)
    tokens = torch.tensor([r.query_start for r in rows], dtype=torch.long).to(device)
    valid = torch.arange(bs, device=device)[None, :] < items[2][:, None]
    unowned = torch.nonzero(torch.arange(bs)[None, :] >= count[:, None]).T.to(device)  # [2, U]
    return _Singles(tokens, items[0], items[1], valid, unowned[0], unowned[1])


def _chunk(row: RowLayout, bs: int, device: torch.device) -> _Chunk:
    own_blocks = row.own_blocks[: -(-row.own_len // bs)]
    blocks = torch.tensor(row.prefix_blocks + own_blocks, dtype=torch.long).to(device)
    prefix_slots = torch.arange(len(row.prefix_blocks) * bs, device=device)
    own_slots = torch.arange(len(own_blocks) * bs, device=device)
    queries = row.own_start + torch.arange(row.query_len, device=device)
    visible = torch.cat(
        [
            (prefix_slots < row.prefix_len).expand(row.query_len, -1),
            own_slots[None, :] <= queries[:, None],  # causal over own tokens
        ],
        dim=1,
    )
    start, own_from = row.query_start, len(row.prefix_blocks) * bs
    unowned = (slice(row.prefix_len, own_from), slice(own_from + row.own_len, None))
    return _Chunk(slice(start, start + row.query_len), blocks, visible, unowned)


def _attend_singles(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, s: _Singles, scale: float
) -> torch.Tensor:
    """q [R, H, hd] -> [R, H, hd]: softmax over each row's items, merged by segment sums."""
    rows, heads, hd = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    keys = k_pool.index_select(0, s.item_block)  # [N, H_kv, bs, hd] (fresh copies)
    values = v_pool.index_select(0, s.item_block)
    values[s.unowned_item, :, s.unowned_slot] = 0  # select: what they hold never multiplies
    qi = q.view(rows, kv_heads, group, hd).index_select(0, s.item_row)  # [N, H_kv, G, hd]
    scores = (qi @ keys.transpose(-1, -2)).float() * scale  # [N, H_kv, G, bs]
    scores = scores.masked_fill(~s.item_valid[:, None, None, :], float("-inf"))
    index = s.item_row[:, None, None].expand(-1, kv_heads, group)
    top = torch.full((rows, kv_heads, group), float("-inf"), device=q.device)
    top = top.scatter_reduce(0, index, scores.amax(dim=-1), "amax")  # [R, H_kv, G]
    weights = torch.exp(scores - top[s.item_row][..., None])  # [N, H_kv, G, bs]
    total = torch.zeros_like(top).index_add_(0, s.item_row, weights.sum(dim=-1))
    # Normalised before they multiply values: a row's weights sum to 1, so every output is a
    # convex combination of its values and cannot overflow where they do not.
    weights = weights / total[s.item_row][..., None]
    partial = (weights.to(values.dtype) @ values).float()  # [N, H_kv, G, hd]
    out = torch.zeros(rows, kv_heads, group, hd, device=q.device).index_add_(0, s.item_row, partial)
    return out.view(rows, heads, hd).to(q.dtype)


def _attend_chunk(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, c: _Chunk, scale: float
) -> torch.Tensor:
    """One row's queries q [q, H, hd] over its blocks gathered as one sequence -> [q, H, hd]."""
    kv_heads, bs, hd = k_pool.shape[1:]
    # Seen as [blocks * H_kv, bs, hd], the pool holds block b of KV head h at b * H_kv + h:
    # gathering in (head, block) order lays out each head's sequence contiguously in one copy
    # (gathering blocks, then transposing heads first, copies twice: measured ~5x slower).
    heads = torch.arange(kv_heads, device=q.device)
    index = (c.blocks[None, :] * kv_heads + heads[:, None]).reshape(-1)
    keys = k_pool.view(-1, bs, hd).index_select(0, index).view(kv_heads, -1, hd)  # [H_kv, S, hd]
    values = v_pool.view(-1, bs, hd).index_select(0, index).view(kv_heads, -1, hd)
    for gap in c.unowned:  # select: SDPA adds -inf to a masked score, and NaN + -inf is NaN
        keys[:, gap] = 0
        values[:, gap] = 0
    if q.shape[0] == 1:  # a long decoding row: one matrix-vector product per KV head
        scores = (q.view(kv_heads, -1, hd) @ keys.transpose(1, 2)).float() * scale  # [H_kv, G, S]
        weights = scores.masked_fill(~c.visible, float("-inf")).softmax(dim=-1)
        return (weights.to(values.dtype) @ values).view(1, -1, hd)
    shrink = _shrink(values)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values.div_(shrink)[None],
        attn_mask=c.visible[None, None], scale=scale, enable_gqa=q.shape[1] != kv_heads,
    )  # [1, H, q, hd]
    return out[0].transpose(0, 1).mul_(shrink)


def _shrink(values: torch.Tensor) -> torch.Tensor:
    """A power of two (a 0-d tensor, >= 1) to divide values [H_kv, S, hd] by before SDPA.

    SDPA's kernels sum exp(score - running max) * value before they divide by the weights' sum,
    up to S * max|v|, which overflows float32 where the normalised output does not. Dividing by
    a power of two is exact, and it is 1 unless that sum could come near the accumulator's max.
    """
    accumulator = torch.promote_types(values.dtype, torch.float32)
    room = torch.finfo(accumulator).max / 4
    largest = torch.linalg.vector_norm(values, ord=float("inf"), dtype=accumulator)
    need = (largest / room * values.shape[1]).clamp(min=1)  # divided first: no overflow
    return torch.exp2(torch.ceil(torch.log2(need))).to(values.dtype)


def choose_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend a setting names; "auto" picks the best one available for `device`."""
    if name in ("auto", "torch"):
        return TorchPagedAttention()
    raise ValueError(f"unknown attention backend {name!r} (use auto or torch)")
