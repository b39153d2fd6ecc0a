"""Tiny random-weight models of every supported family, saved like a user's model.

Tests build a model from a config and save it with `save_pretrained`, with the tokenizer and the
saving code of `examples/make_tiny_model.py` (nothing comes from a hub), then load it through
`server.models.loader`, the same path a user's model directory takes.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from examples.make_tiny_model import CHAT_TEMPLATE, EOS, save_random_model
from examples.make_tiny_model import build_tokenizer as make_tokenizer

__all__ = ["CHAT_TEMPLATE", "EOS", "FAMILIES", "build_tokenizer", "make_tiny_model", "tiny_config"]

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "gpt_neox")

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "prefix tuning steers a frozen language model with learned keys and values",
    "Answer: yes. Answer: no. Response in French: bonjour, merci, oui, non",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600 emoji and accents",
]


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """The example's byte-level BPE tokenizer, trained on a corpus with multi-byte characters."""
    return make_tokenizer(vocab_size, corpus=_CORPUS, repeat=4)


def tiny_config(family: str, vocab_size: int) -> PretrainedConfig:
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, **common)
    if family == "llama":
        return LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256, **common,
        )
    if family == "qwen2":
        return Qwen2Config(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256, **common,
        )
    if family == "qwen3":
        return Qwen3Config(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=128, max_position_embeddings=256, **common,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=256, rotary_pct=0.5, **common,
        )
    raise ValueError(f"unknown family {family!r}")


def make_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    """Build, randomly initialise and save a tiny `family` model + tokenizer into `directory`."""
    tokenizer = build_tokenizer()
    return save_random_model(tiny_config(family, len(tokenizer)), tokenizer, directory, seed)
