"""What the runner tells the attention backend about one step: plain ints and lists, per row."""

from __future__ import annotations

from dataclasses import dataclass


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
