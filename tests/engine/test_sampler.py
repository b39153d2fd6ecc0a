"""Sampling every row of a mixed batch at once."""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams
from server.engine.sampler import make_generator, sample

CPU = torch.device("cpu")


def _logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    gen = make_generator(params, CPU)
    return [int(sample(logits_row[None], [params], [gen])[0]) for _ in range(n)]


def test_greedy_rows_take_the_argmax() -> None:
    logits = _logits(4)
    greedy = SamplingParams()
    assert sample(logits, [greedy] * 4, [None] * 4).tolist() == logits.argmax(-1).tolist()
    assert make_generator(greedy, CPU) is None


def test_a_seeded_row_is_independent_of_its_neighbours() -> None:
    row = _logits(1, seed=1)[0]
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=42)
    alone = _draw_many(row, params, 20)
    # The same row in a batch of other sampled and greedy rows, with their own generators.
    others = [SamplingParams(temperature=0.7, seed=s) for s in range(3)] + [SamplingParams()]
    gens = [make_generator(p, CPU) for p in [params, *others]]
    mixed = []
    for step in range(20):
        batch = torch.cat([row[None], _logits(4, seed=100 + step)])
        mixed.append(int(sample(batch, [params, *others], gens)[0]))
    assert mixed == alone
    other_seed = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=43)
    assert _draw_many(row, other_seed, 20) != alone


def test_top_k_and_top_p_restrict_the_support() -> None:
    row = _logits(1, seed=2)[0]
    order = row.argsort(descending=True).tolist()
    top3 = set(_draw_many(row, SamplingParams(temperature=5.0, top_k=3, seed=1), 300))
    assert top3 == set(order[:3])  # hot temperature: all three show up, nothing else
    probs = torch.softmax(row, -1)[order]
    head = int((probs.cumsum(0) < 0.5).sum()) + 1  # smallest head with mass >= 0.5
    seen = set(_draw_many(row, SamplingParams(temperature=1.0, top_p=0.5, seed=2), 300))
    assert seen <= set(order[:head]) and len(seen) == head


def test_temperature_sampling_follows_the_distribution() -> None:
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = _draw_many(row, SamplingParams(temperature=1.0, seed=3), 4000)
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert (freq - torch.softmax(row, -1)).abs().max() < 0.03


def test_a_vanishing_temperature_samples_as_greedy() -> None:
    logits = _logits(3)
    tiny = SamplingParams(temperature=2.5e-234, top_p=0.01, seed=1)
    assert make_generator(tiny, CPU) is None
    gens = [make_generator(tiny, CPU)] * 3
    assert sample(logits, [tiny] * 3, gens).tolist() == logits.argmax(-1).tolist()


def test_non_finite_logits_fail_no_row() -> None:
    logits = _logits(3)
    logits[1, 7] = float("inf")
    logits[2] = float("nan")
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(3)]
    tokens = sample(logits, params, [make_generator(p, CPU) for p in params]).tolist()
    assert tokens[1] == 7  # the inf logit is the only possible choice
    assert 0 <= tokens[0] < logits.shape[1] and 0 <= tokens[2] < logits.shape[1]


def test_unseeded_rows_draw_together_from_the_shared_generator() -> None:
    logits = _logits(6)
    params = [SamplingParams(temperature=1.0)] * 3 + [SamplingParams(temperature=1.0, seed=5)]
    params += [SamplingParams()] * 2
    gens = [make_generator(p, CPU) for p in params]
    assert gens[:3] == [None] * 3 and gens[3] is not None  # only the seeded row has its own
    draws = [sample(logits, params, gens, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert draws[0][:3].tolist() == draws[1][:3].tolist()  # same shared stream, same draws
    assert draws[0][4:].tolist() == logits[4:].argmax(-1).tolist()


def test_a_top_k_beyond_the_vocabulary_is_no_filter() -> None:
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    huge = SamplingParams(temperature=1.0, top_k=2**63 - 1, seed=4)
    assert set(_draw_many(row, huge, 400)) == {0, 1, 2, 3}
