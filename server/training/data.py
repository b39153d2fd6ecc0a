"""Training data: JSONL records -> token ids with masked labels -> right-padded batches.

Records are `{"prompt": ..., "response": ...}` (loss on the response only) or `{"text": ...}`
(loss on every token). The prompt is tokenized on its own, exactly as the server tokenizes a
request's prompt (`add_special_tokens=True`, or the chat template with the prompt as the user turn),
and the response is tokenized separately and appended: the model learns on the same token
boundary it will see when it generates the response after that prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of tokens that carry no loss (prompt, padding, the first token)


class DataError(ValueError):
    """The training data is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str | None  # None: a plain {"text"} record, loss on all tokens
    response: str  # the response, or the whole text of a {"text"} record


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids: labels[i] is the token at position i, or IGNORE

    @property
    def num_labels(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, S] long, right-padded with the pad token
    attention_mask: torch.Tensor  # [B, S] long: 1 = real token, 0 = padding
    labels: torch.Tensor  # [B, S] long: the token to predict at each position, IGNORE = no loss
    num_labels: int  # loss-bearing tokens in the batch
    num_tokens: int  # real (unpadded) tokens in the batch

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device), self.num_labels, self.num_tokens)


@dataclass(frozen=True)
class EncodeOptions:
    max_length: int  # text tokens per example; longer ones lose their tail
    chat_template: bool = False
    append_eos: bool = True


# ---- reading ---------------------------------------------------------------------------------

DataSource = str | Path | Iterable[dict[str, Any] | Example]


def load_examples(source: DataSource) -> list[Example]:
    """Examples from a JSONL path, or from an iterable of records / `Example`s."""
    if isinstance(source, str | Path):
        return read_jsonl(Path(source))
    return [item if isinstance(item, Example) else parse_record(item, f"record {i + 1}")
            for i, item in enumerate(source)]


def read_jsonl(path: Path) -> list[Example]:
    """One example per non-blank line; errors name `path:line`."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
            examples.append(parse_record(record, where))
    if not examples:
        raise DataError(f"{path}: holds no examples")
    return examples


def parse_record(record: object, where: str) -> Example:
    """`{"prompt", "response"}` or `{"text"}` (other keys are ignored)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record or "response" in record:
        prompt, response = record.get("prompt"), record.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"{where}: 'prompt' and 'response' must both be strings")
        return Example(prompt=prompt, response=response)
    if isinstance(record.get("text"), str):
        if not record["text"]:
            raise DataError(f"{where}: 'text' is empty")
        return Example(prompt=None, response=record["text"])
    raise DataError(f"{where}: expected keys 'prompt' + 'response', or 'text'")


# ---- tokenizing ------------------------------------------------------------------------------

def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool) -> list[int]:
    """The prompt's token ids exactly as the model will see them at inference."""
    if not chat_template:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_template was requested, but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    # The template already holds any BOS it wants.
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def encode(
    example: Example, tokenizer: PreTrainedTokenizerBase, options: EncodeOptions
) -> Encoded | None:
    """Token ids and labels of one example; None when truncation leaves no loss-bearing token."""
    eos_id = tokenizer.eos_token_id
    eos = [eos_id] if options.append_eos and eos_id is not None else []
    if example.prompt is None:
        ids = list(tokenizer(example.response, add_special_tokens=True)["input_ids"]) + eos
        labels = list(ids)
    else:
        head = prompt_ids(tokenizer, example.prompt, options.chat_template)
        if not head:
            raise DataError(f"prompt {example.prompt!r} encodes to no tokens; use a 'text' record")
        tail = list(tokenizer(example.response, add_special_tokens=False)["input_ids"]) + eos
        ids, labels = head + tail, [IGNORE] * len(head) + tail
    ids, labels = ids[: options.max_length], labels[: options.max_length]
    labels[0] = IGNORE  # no position before the first token predicts it
    encoded = Encoded(input_ids=ids, labels=labels)
    return encoded if encoded.num_labels else None


def encode_all(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, options: EncodeOptions
) -> tuple[list[Encoded], int]:
    """(the encoded examples, how many were dropped for having no loss-bearing token left)."""
    encoded = [encode(example, tokenizer, options) for example in examples]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


# ---- splitting and batching ------------------------------------------------------------------

def split_validation(
    examples: Sequence[Encoded], fraction: float, seed: int
) -> tuple[list[Encoded], list[Encoded]]:
    """(train, val): a seeded random `fraction` held out, at least one of each when possible."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def collate(examples: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-pad a list of examples into one batch (positions then start at P in every row)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels, int((labels != IGNORE).sum()), int(mask.sum()))


def epoch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch: a fresh permutation per epoch.

    A pure function of (seed, epoch), so a resumed run replays exactly the same batches.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def eval_batches(examples: Sequence[Encoded], batch_size: int, pad_id: int) -> list[Batch]:
    """Validation batches, in order (the mean loss doesn't depend on it)."""
    return [collate(examples[i : i + batch_size], pad_id)
            for i in range(0, len(examples), batch_size)]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id (padding never carries loss nor attention, so any id works as a fallback)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# ---- everything together ---------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingData:
    train: list[Encoded]
    val: list[Encoded]
    dropped: int  # examples with no loss-bearing token left after truncation
    pad_id: int

    @property
    def digest(self) -> str:
        """sha256 of the training token ids and labels (a resume must see the same data)."""
        h = hashlib.sha256()
        for e in self.train:
            h.update(json.dumps([e.input_ids, e.labels]).encode())
        return h.hexdigest()


def prepare(
    train_source: DataSource,
    val_source: DataSource | None,
    tokenizer: PreTrainedTokenizerBase,
    options: EncodeOptions,
    *,
    val_fraction: float,
    seed: int,
) -> TrainingData:
    """Read, tokenize and split: the validation data is `val_source`, else a held-out fraction."""
    train, dropped = encode_all(load_examples(train_source), tokenizer, options)
    if val_source is not None:
        val, dropped_val = encode_all(load_examples(val_source), tokenizer, options)
        dropped += dropped_val
    else:
        train, val = split_validation(train, val_fraction, seed)
    if not train:
        raise DataError("no training example is left (each needs at least one response token)")
    return TrainingData(train=train, val=val, dropped=dropped, pad_id=pad_token_id(tokenizer))
