"""The data pipeline: parsing, label masking, truncation, the split and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.training.data import (
    IGNORE,
    DataError,
    EncodeOptions,
    Example,
    collate,
    encode,
    epoch_order,
    prepare,
    read_jsonl,
    split_validation,
)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_both_record_kinds_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "hi", "response": "yo", "extra": 1}), "",
        json.dumps({"text": "plain text"}),
    ])
    assert read_jsonl(path) == [Example("hi", "yo"), Example(None, "plain text")]


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:1: not valid JSON"),
    ("[1, 2]", "d.jsonl:1: expected a JSON object"),
    ('{"prompt": "x"}', "d.jsonl:1: 'prompt' and 'response' must both be strings"),
    ('{"prompt": 1, "response": "x"}', "must both be strings"),
    ('{"text": ""}', "'text' is empty"),
    ('{"foo": "bar"}', "expected keys 'prompt' + 'response', or 'text'"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "d.jsonl", [line])
    with pytest.raises(DataError, match=message.replace("+", r"\+")):
        read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no examples"):
        read_jsonl(_write(tmp_path / "e.jsonl", ["", "  "]))


def test_prompt_tokens_carry_no_loss_and_response_ends_with_eos(tiny_llama):
    tok = tiny_llama.tokenizer
    prompt_ids = tok("fox dog\nAnswer:")["input_ids"]
    response_ids = tok(" yes yes", add_special_tokens=False)["input_ids"]
    e = encode(Example("fox dog\nAnswer:", " yes yes"), tok, EncodeOptions(max_length=64))
    assert e is not None
    assert e.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert e.labels == [IGNORE] * len(prompt_ids) + response_ids + [tok.eos_token_id]
    no_eos = encode(Example("fox dog\nAnswer:", " yes yes"), tok,
                    EncodeOptions(max_length=64, append_eos=False))
    assert no_eos is not None and no_eos.input_ids == prompt_ids + response_ids


def test_text_records_carry_loss_on_every_token_but_the_first(tiny_llama):
    tok = tiny_llama.tokenizer
    e = encode(Example(None, "hello world"), tok, EncodeOptions(max_length=64))
    ids = tok("hello world")["input_ids"] + [tok.eos_token_id]
    assert e is not None and e.input_ids == ids
    assert e.labels == [IGNORE] + ids[1:]  # nothing before the first token predicts it


def test_chat_template_wraps_the_prompt_as_the_user_turn(tiny_llama):
    tok = tiny_llama.tokenizer
    e = encode(Example("hi there", " yes"), tok, EncodeOptions(max_length=64, chat_template=True))
    assert e is not None
    n_prompt = e.labels.count(IGNORE)
    assert tok.decode(e.input_ids[:n_prompt]) == "<|user|>hi there\n<|assistant|>"
    assert tok.decode(e.input_ids[n_prompt:]) == " yes<|endoftext|>"


def test_truncation_keeps_the_head_and_drops_examples_without_response(tiny_llama):
    tok = tiny_llama.tokenizer
    long_prompt = "the quick brown fox jumps over the lazy dog " * 3
    n_prompt = len(tok(long_prompt)["input_ids"])
    cut = encode(Example(long_prompt, " yes yes yes"), tok, EncodeOptions(max_length=n_prompt + 1))
    assert cut is not None and len(cut.input_ids) == n_prompt + 1 and cut.num_labels == 1
    assert encode(Example(long_prompt, " yes"), tok, EncodeOptions(max_length=n_prompt)) is None
    data = prepare([{"prompt": long_prompt, "response": " yes"}, {"prompt": "a", "response": "b"}],
                   None, tok, EncodeOptions(max_length=n_prompt), val_fraction=0.0, seed=0)
    assert (len(data.train), data.dropped) == (1, 1)


def test_empty_prompt_is_refused(tiny_llama):
    with pytest.raises(DataError, match="use a 'text' record"):
        encode(Example("", "x"), tiny_llama.tokenizer, EncodeOptions(max_length=8))


def test_validation_split_is_seeded_and_disjoint(tiny_llama):
    examples = [encode(Example(f"p{i}", "r"), tiny_llama.tokenizer, EncodeOptions(16))
                for i in range(20)]
    kept = [e for e in examples if e is not None]
    train, val = split_validation(kept, 0.25, seed=3)
    again = split_validation(kept, 0.25, seed=3)
    assert (len(train), len(val)) == (15, 5) and (train, val) == again
    assert sorted(map(id, train + val)) == sorted(map(id, kept))
    assert split_validation(kept, 0.25, seed=4)[1] != val


def test_collate_right_pads_with_ignored_labels(tiny_llama):
    tok = tiny_llama.tokenizer
    a = encode(Example("fox", " yes"), tok, EncodeOptions(32))
    b = encode(Example("the quick brown fox jumps", " yes yes"), tok, EncodeOptions(32))
    assert a is not None and b is not None
    batch = collate([a, b], pad_id=7)
    width = len(b.input_ids)
    assert batch.input_ids.shape == (2, width)
    n = len(a.input_ids)
    assert batch.input_ids[0, :n].tolist() == a.input_ids
    assert batch.input_ids[0, n:].tolist() == [7] * (width - n)
    assert batch.attention_mask[0].tolist() == [1] * n + [0] * (width - n)
    assert batch.labels[0, n:].tolist() == [IGNORE] * (width - n)
    assert batch.num_labels == a.num_labels + b.num_labels
    assert batch.num_tokens == n + width


def test_epoch_order_is_a_fresh_seeded_permutation():
    first = epoch_order(10, 3, seed=1, epoch=0)
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert first == epoch_order(10, 3, seed=1, epoch=0)
    assert first != epoch_order(10, 3, seed=1, epoch=1)
