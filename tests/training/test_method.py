"""The method as the seed describes it: a frozen base, P_theta through each layer's W_k / W_v,
masked cross-entropy on response tokens, AdamW on the prefix only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.models.prefix_kv import forward_with_prefix, kv_from_p_theta
from server.training.config import TrainConfig
from server.training.data import IGNORE, EncodeOptions, Example, collate, encode, prepare
from server.training.loop import Trainer
from server.training.objective import masked_nll_sum, prefix_logits
from tests.training.tasks import YES, prompts, records


def _trainer(loaded, **overrides) -> Trainer:
    cfg = TrainConfig(**{"prefix_len": 4, "max_steps": 2, "epochs": 0, "batch_size": 4,
                         "init": "random", "progress": False, **overrides})
    data = prepare(records(YES, prompts(8, seed=1)), None, loaded.tokenizer,
                   EncodeOptions(max_length=64), val_fraction=0.0, seed=0)
    return Trainer(loaded, data, cfg)


def test_only_the_prefix_gets_gradients_and_the_base_stays_bit_identical(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    trainer = _trainer(tiny_llama)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in trainer.prefix.parameters()}
    batch = trainer.micro_batches(0)[0]
    trainer._backward(batch, batch.num_labels)
    assert all(p.grad is None and not p.requires_grad for p in tiny_llama.model.parameters())
    grad = trainer.prefix.p_theta.grad
    assert grad is not None and bool((grad[0].abs().sum(-1) > 0).all())  # every row, layer 0
    assert bool((grad[1].abs().sum(-1) > 0).all())  # and the last layer
    trainer.optimizer.zero_grad()
    trainer.run()  # two full optimizer steps
    after = tiny_llama.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _reference_nll(loaded, p_theta, example) -> float:
    """Sum of -log p(response token | prefix, everything before it), one forward per token."""
    keys, values = kv_from_p_theta(loaded, p_theta)
    total = 0.0
    for j, label in enumerate(example.labels):
        if label == IGNORE:
            continue
        context = torch.tensor([example.input_ids[:j]])
        logits = forward_with_prefix(loaded, context, None, keys, values)[0, -1]
        total -= float(F.log_softmax(logits.double(), -1)[label])
    return total


def test_loss_counts_only_response_tokens(tiny_llama):
    tok = tiny_llama.tokenizer
    p_theta = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    short = encode(Example("fox dog\nAnswer:", " yes yes"), tok, EncodeOptions(64))
    long = encode(Example("the quick brown fox jumps over\nAnswer:", " no"), tok, EncodeOptions(64))
    assert short is not None and long is not None
    batch = collate([short, long], pad_id=0)
    with torch.no_grad():
        batched = float(masked_nll_sum(prefix_logits(tiny_llama, p_theta, batch), batch.labels))
    expected = sum(_reference_nll(tiny_llama, p_theta, e) for e in (short, long))
    assert abs(batched - expected) < 1e-4 * abs(expected)


def test_prompt_and_padding_positions_get_no_gradient(tiny_llama):
    tok = tiny_llama.tokenizer
    short = encode(Example("fox dog\nAnswer:", " yes yes"), tok, EncodeOptions(64))
    long = encode(Example("the quick brown fox jumps over\nAnswer:", " no"), tok, EncodeOptions(64))
    assert short is not None and long is not None
    batch = collate([short, long], pad_id=0)
    p_theta = torch.zeros(2, 3, 64)
    logits = prefix_logits(tiny_llama, p_theta, batch).detach().requires_grad_(True)
    masked_nll_sum(logits, batch.labels).backward()
    assert logits.grad is not None
    # Position i predicts token i + 1: it has a gradient exactly when that is a response token.
    predicts_response = torch.zeros(batch.labels.shape, dtype=torch.bool)
    predicts_response[:, :-1] = batch.labels[:, 1:] != IGNORE
    touched = logits.grad.abs().sum(-1) > 0  # [B, S]
    assert torch.equal(touched, predicts_response)
    assert int(predicts_response.sum()) == short.num_labels + long.num_labels


def test_padding_content_does_not_change_the_loss(tiny_llama):
    tok = tiny_llama.tokenizer
    short = encode(Example("fox dog\nAnswer:", " yes"), tok, EncodeOptions(64))
    long = encode(Example("the quick brown fox jumps over\nAnswer:", " no"), tok, EncodeOptions(64))
    assert short is not None and long is not None
    p_theta = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    losses = []
    for pad in (0, 5, 300):
        batch = collate([short, long], pad_id=pad)
        with torch.no_grad():
            losses.append(float(masked_nll_sum(prefix_logits(tiny_llama, p_theta, batch),
                                               batch.labels)))
    assert max(losses) - min(losses) < 1e-5


def test_gradient_accumulation_equals_one_big_batch(tiny_llama):
    big = _trainer(tiny_llama, batch_size=4, grad_accum=1, max_steps=1, max_grad_norm=0.0)
    small = _trainer(tiny_llama, batch_size=2, grad_accum=2, max_steps=1, max_grad_norm=0.0)
    assert torch.equal(big.prefix.p_theta, small.prefix.p_theta)
    big.run()
    small.run()
    assert not torch.equal(big.prefix.p_theta, _trainer(tiny_llama).prefix.p_theta)
    torch.testing.assert_close(big.prefix.p_theta, small.prefix.p_theta, rtol=0, atol=1e-6)
