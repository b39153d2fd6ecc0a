"""The paged attention backend reads exactly the slots each row owns, whatever the others hold.

Every slot of the pool that a row does not own (the unused tail of its prefix's last block and of
its own last block, and every block it does not hold) is filled with NaN, +inf and -inf; each
row's output must equal dense SDPA over only its own keys. All three paths run: one-token rows
attended block by block, a long decode row gathered as one sequence, and a prompt chunk (SDPA
with a causal mask).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.attention.backends import LONG_ROW_BLOCKS, TorchPagedAttention
from server.engine.attention.layout import RowLayout, StepLayout

BS, KV_HEADS, HEADS, HD = 4, 2, 4, 8
POISONS = (float("nan"), float("inf"), float("-inf"))

# (prefix_len, own tokens already cached, tokens this step): every block ends partly used.
ROWS = [
    (5, 6, 1),  # decode, block by block
    (0, 2, 1),  # decode without a prefix
    (3, LONG_ROW_BLOCKS * BS + 1, 1),  # a long decode row: one gathered sequence
    (7, 0, 6),  # a prompt chunk: SDPA with a causal mask
    (2, 5, 3),  # a later chunk of a prompt
]


def _layout() -> tuple[StepLayout, list[list[tuple[int, int]]]]:
    """Rows on disjoint blocks, and for each row the (block, slot) pairs it owns, in order."""
    rows, owned, next_block, start = [], [], 1, 0  # block 0 belongs to nobody
    for prefix_len, cached, length in ROWS:
        own_len = cached + length
        prefix = list(range(next_block, next_block + -(-prefix_len // BS)))
        next_block += len(prefix)
        own = list(range(next_block, next_block + -(-own_len // BS)))
        next_block += len(own)
        rows.append(RowLayout(start, length, cached, own, prefix, prefix_len))
        slots = [(prefix[i // BS], i % BS) for i in range(prefix_len)]
        owned.append(slots + [(own[i // BS], i % BS) for i in range(own_len)])
        start += length
    return StepLayout(BS, rows, start), owned


def _poisoned_pool(owned: list[list[tuple[int, int]]], blocks: int, poison: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    keys = torch.full((blocks, KV_HEADS, BS, HD), poison)  # [blocks, H_kv, bs, hd]
    values = torch.full((blocks, KV_HEADS, BS, HD), poison)
    for slots in owned:
        for block, slot in slots:
            keys[block, :, slot] = torch.randn(KV_HEADS, HD, generator=g)
            values[block, :, slot] = torch.randn(KV_HEADS, HD, generator=g)
    return keys, values


def _dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row: RowLayout,
           slots: list[tuple[int, int]], scale: float) -> torch.Tensor:
    """SDPA over only the row's owned keys: q [q, H, hd] -> [q, H, hd]."""
    k = torch.stack([keys[b, :, s] for b, s in slots], dim=1)  # [H_kv, S, hd]
    v = torch.stack([values[b, :, s] for b, s in slots], dim=1)
    own_index = row.own_start + torch.arange(row.query_len)
    slot_index = torch.arange(len(slots)) - row.prefix_len
    allowed = slot_index[None, :] <= own_index[:, None]  # prefix slots are negative: all seen
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=allowed[None, None], scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf"])
def test_slots_a_row_does_not_own_never_reach_its_output(poison: float) -> None:
    layout, owned = _layout()
    blocks = 1 + sum(len(r.prefix_blocks) + len(r.own_blocks) for r in layout.rows)
    keys, values = _poisoned_pool(owned, blocks, poison)
    q = torch.randn(layout.num_tokens, HEADS, HD, generator=torch.Generator().manual_seed(1))
    backend = TorchPagedAttention()
    scale = HD**-0.5
    out = backend.attend(q, keys, values, backend.prepare(layout, torch.device("cpu")), scale)
    assert torch.isfinite(out).all()
    for row, slots in zip(layout.rows, owned, strict=True):
        rows = slice(row.query_start, row.query_start + row.query_len)
        want = _dense(q[rows], keys, values, row, slots, scale)
        torch.testing.assert_close(out[rows], want, atol=1e-5, rtol=1e-5)


def test_huge_values_do_not_overflow_where_softmax_would_not() -> None:
    """Keys 0 and every value 1e38 (float32's max is 3.4e38): each output is exactly a convex
    combination of the values, 1e38, not the sum of unnormalised weights times them (inf)."""
    layout, owned = _layout()
    blocks = 1 + sum(len(r.prefix_blocks) + len(r.own_blocks) for r in layout.rows)
    keys = torch.zeros(blocks, KV_HEADS, BS, HD)
    values = torch.full((blocks, KV_HEADS, BS, HD), 1e38)
    q = torch.randn(layout.num_tokens, HEADS, HD, generator=torch.Generator().manual_seed(2))
    backend = TorchPagedAttention()
    out = backend.attend(q, keys, values, backend.prepare(layout, torch.device("cpu")), 0.35)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full_like(out, 1e38), rtol=1e-5, atol=0)


def test_sdpa_with_a_boolean_mask_does_not_hide_nan() -> None:
    """Why the gathered sequences are zeroed where unowned, keys *and* values: a masked
    position still takes part in SDPA's products on this torch (0 x NaN = NaN)."""
    q = torch.randn(1, 2, 3, 8)
    allowed = torch.ones(3, 5, dtype=torch.bool)
    allowed[:, 4] = False
    for poisoned in ("keys", "values"):
        k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        (k if poisoned == "keys" else v)[..., 4, :] = float("nan")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None])
        if not out.isnan().any():
            pytest.skip(f"this torch's SDPA hides NaN {poisoned} behind a mask")


def _random_layout(g: torch.Generator) -> tuple[StepLayout, list[list[tuple[int, int]]], int]:
    """Random rows (short and long decode rows, prompt chunks) on a shuffled pool: block ids in
    random order, two prefixes shared by several rows, partial last blocks anywhere."""

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=g))

    pool = torch.randperm(256, generator=g).tolist()  # block ids handed out in random order
    prefixes = []
    for _ in range(2):
        length = draw(1, 3 * BS + 1)
        prefixes.append(([pool.pop() for _ in range(-(-length // BS))], length))
    rows, owned, start = [], [], 0
    for _ in range(draw(3, 8)):
        kind = draw(0, 2)
        query_len = 1 if kind < 2 else draw(2, 9)
        cached = draw(LONG_ROW_BLOCKS * BS, LONG_ROW_BLOCKS * BS + 9) if kind == 1 else draw(0, 11)
        prefix, prefix_len = prefixes[draw(0, 1)] if draw(0, 2) else ([], 0)
        own_len = cached + query_len
        own = [pool.pop() for _ in range(-(-own_len // BS))]
        rows.append(RowLayout(start, query_len, cached, own, prefix, prefix_len))
        slots = [(prefix[i // BS], i % BS) for i in range(prefix_len)]
        owned.append(slots + [(own[i // BS], i % BS) for i in range(own_len)])
        start += query_len
    return StepLayout(BS, rows, start), owned, 256


@pytest.mark.parametrize("seed", range(8))
def test_random_pools_and_block_tables_match_dense_attention(seed: int) -> None:
    """Grouped-query heads, shared and partial prefix blocks, short and long rows, chunks, on a
    random pool whose every slot holds data (another request's): equal to dense SDPA per row."""
    g = torch.Generator().manual_seed(seed)
    layout, owned, blocks = _random_layout(g)
    keys = torch.randn(blocks, KV_HEADS, BS, HD, generator=g)
    values = torch.randn(blocks, KV_HEADS, BS, HD, generator=g)
    q = torch.randn(layout.num_tokens, HEADS, HD, generator=g)
    backend = TorchPagedAttention()
    scale = HD**-0.5
    out = backend.attend(q, keys, values, backend.prepare(layout, torch.device("cpu")), scale)
    for row, slots in zip(layout.rows, owned, strict=True):
        rows = slice(row.query_start, row.query_start + row.query_len)
        want = _dense(q[rows], keys, values, row, slots, scale)
        torch.testing.assert_close(out[rows], want, atol=1e-5, rtol=1e-5)
