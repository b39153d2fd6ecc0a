"""Initialisation (real words / small random values) and the MLP reparameterisation."""

from __future__ import annotations

import pytest
import torch

from server.training.config import TrainConfig, TrainConfigError
from server.training.data import EncodeOptions, Example, collate, encode
from server.training.objective import prefix_logits
from server.training.prefix import DirectPrefix, MlpPrefix, build_prefix, export_p_theta


def _build(loaded, **kw):
    cfg = TrainConfig(**{"progress": False, **kw})
    return build_prefix(loaded.model, loaded.tokenizer, loaded.fingerprint.num_layers, cfg)


@pytest.mark.parametrize("prefix_len", [2, 7])
def test_word_init_is_the_texts_embeddings_at_every_layer(tiny_llama, prefix_len):
    tok = tiny_llama.tokenizer
    text = "hello world"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 2 < len(ids) < 7  # so 2 truncates and 7 repeats
    wanted = [ids[i % len(ids)] for i in range(prefix_len)]
    table = tiny_llama.model.model.embed_tokens.weight  # the Llama input embedding itself
    prefix = _build(tiny_llama, init="words", init_text=text, prefix_len=prefix_len)
    assert isinstance(prefix, DirectPrefix)
    p = prefix.p_theta
    assert p.shape == (2, prefix_len, 64)
    for layer in range(2):
        assert torch.equal(p[layer], table[wanted])


def test_random_init_is_small_and_independent_per_layer(tiny_llama):
    p = _build(tiny_llama, init="random", prefix_len=64, seed=5).p_theta.detach()
    for layer in p:
        assert abs(float(layer.std()) - 0.02) < 0.0015
        assert abs(float(layer.mean())) < 0.002
    assert not torch.allclose(p[0], p[1])
    correlation = torch.corrcoef(torch.stack([p[0].flatten(), p[1].flatten()]))[0, 1]
    assert abs(float(correlation)) < 0.1
    assert torch.equal(p, _build(tiny_llama, init="random", prefix_len=64, seed=5).p_theta)
    assert not torch.equal(p, _build(tiny_llama, init="random", prefix_len=64, seed=6).p_theta)
    wide = _build(tiny_llama, init="random", prefix_len=64, init_std=0.1).p_theta.detach()
    assert abs(float(wide.std()) - 0.1) < 0.008


def test_word_init_needs_text_that_encodes():
    with pytest.raises(TrainConfigError, match="non-empty init_text"):
        TrainConfig(init="words", init_text="  ")


def test_mlp_collapses_to_the_p_theta_it_computes(tiny_llama):
    prefix = _build(tiny_llama, reparam="mlp", mlp_hidden=32, prefix_len=5, init="random")
    assert isinstance(prefix, MlpPrefix)
    first, second = prefix.mlp[0], prefix.mlp[2]
    assert (prefix.embedding.shape, second.out_features) == ((5, 64), 2 * 64)
    # The reparameterisation, written out: tanh(E W1^T + b1) W2^T + b2, rows [T, L*d] -> [L, T, d].
    hidden = torch.tanh(prefix.embedding @ first.weight.T + first.bias)
    by_hand = (hidden @ second.weight.T + second.bias).view(5, 2, 64).permute(1, 0, 2)
    exported = export_p_theta(prefix)
    torch.testing.assert_close(exported, by_hand.detach(), rtol=0, atol=1e-6)
    assert exported.shape == (2, 5, 64) and exported.dtype == torch.float32
    # What training saw through the MLP is what the exported plain P_theta gives the model.
    e = encode(Example("fox dog\nAnswer:", " yes"), tiny_llama.tokenizer, EncodeOptions(32))
    assert e is not None
    batch = collate([e], pad_id=0)
    with torch.no_grad():
        through_mlp = prefix_logits(tiny_llama, prefix(), batch)
        from_export = prefix_logits(tiny_llama, exported, batch)
    assert torch.equal(through_mlp, from_export)


def test_mlp_word_init_goes_into_its_embedding(tiny_llama):
    prefix = _build(tiny_llama, reparam="mlp", init="words", init_text="hello", prefix_len=3)
    ids = tiny_llama.tokenizer("hello", add_special_tokens=False)["input_ids"]
    table = tiny_llama.model.model.embed_tokens.weight
    assert torch.equal(prefix.embedding, table[[ids[i % len(ids)] for i in range(3)]])
