"""Synthetic steering tasks for the training tests: every prompt gets one fixed response style."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch

WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "tiny",
    "tokenizer", "prefix", "tuning", "steers", "frozen", "language", "model", "keys", "values",
)
YES, NO = " yes yes yes", " no no no"  # the two styles (3 and 6 tokens with the tiny tokenizer)
SUFFIX = "\nAnswer:"


def prompts(count: int, seed: int) -> list[str]:
    """`count` distinct random word strings ending with the answer cue."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < count:
        seen.add(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + SUFFIX)
    return sorted(seen)


def records(style: str, prompt_list: list[str]) -> list[dict[str, str]]:
    return [{"prompt": p, "response": style} for p in prompt_list]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads; on a shared, busy CPU two spinning threads made a
    100-step run ~15x slower (2 s -> 30 s) than one. The previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
