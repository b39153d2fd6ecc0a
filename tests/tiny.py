"""Tiny random-weight models of every supported family, saved like a user's model.

Tests build a model from a config, save it with `save_pretrained` (with a byte-level BPE tokenizer
built here, so nothing comes from a hub) and then load it through `server.models.loader`, the
same path a user's model directory takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "gpt_neox")

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "prefix tuning steers a frozen language model with learned keys and values",
    "Answer: yes. Answer: no. Response in French: bonjour, merci, oui, non",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600 emoji and accents",
]


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style): any text encodes, multi-byte chars split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


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
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    # Bigger-than-default weights so different prefixes give clearly different outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
