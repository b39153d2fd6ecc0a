"""What the runner tells the attention backend about one step: plain ints and lists, per row,
and the vectorised expansions of them that both sides use (per token, per block)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """One request's tokens in this step's packed batch, and where its keys/values live."""

    query_start: int  # index of its first token in the packed batch
    query_len: int  # its tokens in this step (1 when decoding)
    own_start: int  # own tokens already cached before this step (the first query's own index)
    own_blocks: list[int]  # its own block table (covers own_start + query_len tokens)
    prefix_blocks: list[int]  # its prefix's shared blocks (empty without a prefix)
    prefix_len: int  # tokens in the prefix blocks (the last block may be partial)

    @property
    def own_len(self) -> int:
        """Own tokens visible to its last query: everything cached plus this step's tokens."""
        return self.own_start + self.query_len


@dataclass(frozen=True)
class StepLayout:
    block_size: int
    rows: list[RowLayout]
    num_tokens: int  # packed batch length: sum of query_len


def segments(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Items laid out as consecutive segments of `counts` items each (on the host): for every
    item, its segment's index and its index within the segment."""
    sizes = torch.tensor(counts, dtype=torch.long)
    segment = torch.repeat_interleave(torch.arange(len(counts)), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    return segment, torch.arange(segment.shape[0]) - starts[segment]


def flat(lists: list[list[int]]) -> torch.Tensor:
    """The concatenation of int lists as one host tensor."""
    return torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long)


def token_rows(layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed token (on the host): its row's index and its own-token index."""
    row, within = segments([r.query_len for r in layout.rows])
    starts = torch.tensor([r.own_start for r in layout.rows], dtype=torch.long)
    return row, starts[row] + within
