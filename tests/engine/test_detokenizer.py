"""Incremental detokenization: valid text at every delta, stop strings never emitted."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.detokenizer import Detokenizer

TEXT = "café naïve 日本語 😀 emoji: über, Answer: yes. bonjour"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def _stream(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tokenizer, tokenizer.encode("hello world"), stop)
    deltas = [detok.push(t) for t in tokenizer.encode(text)]
    deltas.append(detok.flush())
    return deltas, detok


def test_multibyte_characters_split_across_tokens_are_never_emitted_broken(tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the tokenizer really splits characters
    deltas, _ = _stream(tokenizer, TEXT)
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_an_incomplete_character_at_the_end_is_flushed_as_decode_would(tokenizer) -> None:
    ids = tokenizer.encode("ok 日本")[:-1]  # cut inside the last character
    detok = Detokenizer(tokenizer, [], ())
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids)


@pytest.mark.parametrize("stop", ["Answer:", "本語 😀", "ü"])
def test_stop_strings_end_the_text_and_are_never_emitted(tokenizer, stop: str) -> None:
    deltas, detok = _stream(tokenizer, TEXT, (stop, "never there"))
    assert detok.stopped
    assert "".join(deltas) == TEXT[: TEXT.index(stop)]


def test_text_that_only_looks_like_a_stop_string_is_released(tokenizer) -> None:
    deltas, detok = _stream(tokenizer, "Answer yes", ("Answer:",))
    assert not detok.stopped and "".join(deltas) == "Answer yes"
    # While "Answer" could still become "Answer:", it was held back.
    held = Detokenizer(tokenizer, [], ("Answer:",))
    assert "".join(held.push(t) for t in tokenizer.encode("ok Answer")) == "ok "
