"""Next-token choice for every sampled row of a step at once: greedy, temperature, top-k, top-p.

All rows are handled with batched tensor operations; the result stays on the device and the
caller moves it to the host once per step. A request with a `seed` draws from its own
`torch.Generator`, so its tokens do not depend on what else shares the batch; unseeded rows share
the engine's generator and draw together. A row whose logits hold NaN/inf has no distribution to
draw from and takes its best finite token instead of failing the batch; the engine then fails
that request alone (`finite_rows`).
"""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams

# Temperatures below this sample as greedy: dividing logits by a vanishing temperature overflows
# to inf/NaN probabilities, and the distribution is a point mass on the argmax anyway.
GREEDY_TEMPERATURE = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own random stream when it has a seed (None otherwise)."""
    if is_greedy(params) or params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    shared: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: float32 [rows, vocab] -> token ids [rows] (long, on the logits' device)."""
    tokens = _best(logits)
    rows = [i for i, p in enumerate(params) if not is_greedy(p)]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        drawn = _draw(logits[index], [params[i] for i in rows], [generators[i] for i in rows],
                      shared)
        tokens = tokens.index_copy(0, index, drawn)
    return tokens


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] -> bool [rows]: the row holds no NaN/inf (one vectorised pass)."""
    return torch.isfinite(logits).all(dim=-1)


def _best(logits: torch.Tensor) -> torch.Tensor:
    """Argmax per row, ignoring NaN (a NaN would otherwise win argmax)."""
    return torch.nan_to_num(logits, nan=float("-inf")).argmax(dim=-1)


def _draw(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    shared: torch.Generator | None,
) -> torch.Tensor:
    """Sample each row of logits [rows, vocab] from its own filtered distribution -> [rows]."""
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
    usable = (probs.isfinite() & (probs >= 0)).all(dim=-1) & (probs.sum(dim=-1) > 0)
    probs = torch.where(usable[:, None], probs, torch.ones_like(probs))  # drawable everywhere
    picked = _multinomial(probs, generators, shared)
    picked = torch.where(usable, picked, _best(scaled))
    if order is not None:
        picked = order.gather(1, picked[:, None])[:, 0]
    return picked


def _multinomial(
    probs: torch.Tensor, generators: list[torch.Generator | None], shared: torch.Generator | None
) -> torch.Tensor:
    """One draw per row: seeded rows from their own generator, the others together."""
    own = [i for i, g in enumerate(generators) if g is not None]
    if not own:
        return torch.multinomial(probs, 1, generator=shared)[:, 0]
    picked = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for i in own:
        picked[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    rest = [i for i, g in enumerate(generators) if g is None]
    if rest:
        index = torch.tensor(rest, device=probs.device)
        picked[index] = torch.multinomial(probs[index], 1, generator=shared)[:, 0]
    return picked


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
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params],
                         device=device)
    preceding = probs.cumsum(dim=-1) - probs
    return probs.masked_fill(preceding >= top_p[:, None], 0.0)
