"""Build a small random-weight Llama + tokenizer, saved like a downloaded model.

No model hub is needed: the weights are random and the byte-level BPE tokenizer is trained here on
a small built-in corpus (any text still encodes). The model knows nothing, which makes it a clear
demonstration: whatever style it produces comes from the prefix.

    python examples/make_tiny_model.py /tmp/tiny-llama

The tests build their tiny models with the same tokenizer builder (`tests/tiny.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "Certainly. Kind regards. Arr, matey! Yo ho ho. Question: Answer:",
    "write about the weather, the sea, a ship, the harbour, coffee, the market, a letter",
    "tell me about trains, books, music, gardens, the city, the river, a dog, a cat, bread",
    "what is the time? where is the station? how do I cook rice? why is the sky blue?",
    "the quick brown fox jumps over the lazy dog; numbers 0 1 2 3 4 5 6 7 8 9",
]


def build_tokenizer(
    vocab_size: int = 512, corpus: Sequence[str] = CORPUS, repeat: int = 8
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on `corpus`: any text still encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * repeat, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(directory: Path, seed: int = 0) -> Path:
    """The quick start's model: a Llama with 4 layers, hidden 128."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return save_random_model(config, tokenizer, directory, seed)


def save_random_model(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast, directory: Path, seed: int = 0
) -> Path:
    """Build `config` with random weights and save it with `tokenizer`, like a downloaded model."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger-than-default random weights: outputs depend on the context
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {make_model(args.directory, args.seed)}")


if __name__ == "__main__":
    main()
