"""Next-token choice for each row of a mixed batch: greedy, temperature, top-k, top-p.

Every sampled row draws from its own distribution with its own `torch.Generator` (seeded by the
request's `seed`, or randomly), so a seeded request gives the same tokens whatever else shares
the batch. Greedy rows (temperature 0) are one batched argmax.
"""

from __future__ import annotations

import random

import torch

from server.engine.request import SamplingParams

# Temperatures below this sample as greedy: dividing logits by a vanishing temperature overflows
# to inf/NaN probabilities, and the distribution is a point mass on the argmax anyway.
GREEDY_TEMPERATURE = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own random stream; None for greedy requests (they never draw)."""
    if is_greedy(params):
        return None
    seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """logits: float32 [rows, vocab]; one token id per row."""
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not is_greedy(p)]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        picked = _draw(logits[index], [params[i] for i in rows], [generators[i] for i in rows])
        for i, token in zip(rows, picked, strict=True):
            tokens[i] = token
    return tokens


def _draw(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Sample each row of logits [rows, vocab] from its own filtered distribution."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    scaled = logits / temperature[:, None]
    order = None
    vocab = logits.shape[-1]
    if any(_top_k(p, vocab) > 0 or p.top_p < 1.0 for p in params):
        scaled, order = scaled.sort(dim=-1, descending=True)  # [rows, vocab], best first
        probs = _filter_sorted(scaled, params)
    else:
        probs = torch.softmax(scaled, dim=-1)
    # A row whose logits hold NaN/inf has no distribution to draw from: it takes its best
    # token instead of failing the whole batch inside multinomial.
    usable = (probs.isfinite() & (probs >= 0)).all(dim=-1) & (probs.sum(dim=-1) > 0)
    tokens = []
    for row, generator in enumerate(generators):
        if usable[row]:
            j = int(torch.multinomial(probs[row], 1, generator=generator))
        else:
            j = int(torch.nan_to_num(scaled[row], nan=float("-inf")).argmax())
        tokens.append(j if order is None else int(order[row, j]))
    return tokens


def _top_k(params: SamplingParams, vocab: int) -> int:
    """The row's top-k, 0 when off: a top_k at or beyond the vocabulary keeps every token (and
    never reaches a tensor, where a huge integer would overflow)."""
    return params.top_k if 0 < params.top_k < vocab else 0


def _filter_sorted(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities [rows, vocab] (descending order) with top-k and top-p applied per row."""
    rows, vocab = scaled.shape
    device = scaled.device
    k = torch.tensor([_top_k(p, vocab) or vocab for p in params], device=device)
    ranks = torch.arange(vocab, device=device)
    probs = torch.softmax(scaled.masked_fill(ranks[None, :] >= k[:, None], float("-inf")), dim=-1)
    # Keep the smallest head whose mass reaches top_p: drop tokens whose preceding mass already
    # does. The best token always stays (nothing precedes it).
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params])
    top_p = top_p.to(device)
    preceding = probs.cumsum(dim=-1) - probs
    return probs.masked_fill(preceding >= top_p[:, None], 0.0)
