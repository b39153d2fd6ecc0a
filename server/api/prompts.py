"""Prompts to token ids off the event loop, and over-long prompts refused before tokenizing.

Tokenizing a 1 MB prompt takes a good part of a second; on the event loop it would stall every
other request (and `/health`). The routes encode here instead, on one worker thread (one at a
time: a tokenizer object is not safe to mutate from several threads, and encodes are short), and
hand token ids to the engine.

Before that, a prompt whose byte length already proves it cannot fit the context is refused
without tokenizing it: no token covers more bytes of text than the longest token in the vocabulary
(its UTF-8 spelling: byte-level BPE spells each byte in one or two bytes, SentencePiece's `▁` in
three), so a prompt of B bytes has at least B / longest tokens. A tokenizer with a normalizer may
shrink the text first (NFC composes up to 3 bytes into 1 for some Hangul; NFKC maps a 3-byte
full-width letter to 1 byte), so then the bound is divided by 4 more. The bound only ever refuses
what the exact count would refuse too; the engine checks the exact count.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from server.api.openai_chat import chat_prompt
from server.api.openai_schemas import ChatMessage
from server.errors import ContextLengthError, InvalidRequestError

NORMALIZER_SHRINK = 4


class PromptEncoder:
    def __init__(self, tokenizer: Any, context: int) -> None:
        self._tokenizer = tokenizer
        self.context = context  # at least the engine's: the engine refuses by the exact count
        self.bytes_per_token = max(1, _longest_token_bytes(tokenizer))
        if _may_shrink(tokenizer):
            self.bytes_per_token *= NORMALIZER_SHRINK
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefix-serve-tok")

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, from its length alone."""
        return math.ceil(len(text.encode("utf-8", "surrogatepass")) / self.bytes_per_token)

    def refuse_if_too_long(self, text: str, reserved: int) -> None:
        """ContextLengthError when `text` plus `reserved` tokens (prefix + output) cannot fit."""
        least = self.min_tokens(text)
        if least + reserved > self.context:
            raise ContextLengthError(
                f"the prompt is {len(text)} characters: at least {least} tokens, which with the "
                f"prefix and max_new_tokens ({reserved}) exceeds the context of {self.context} "
                "tokens"
            )

    async def encode(self, text: str, *, add_special_tokens: bool, reserved: int) -> list[int]:
        """Token ids of `text` (refused first if it cannot fit), encoded on the worker thread."""
        _check_unicode(text)
        self.refuse_if_too_long(text, reserved)
        encode = partial(self._tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return list(await self._run(encode))

    async def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The chat template applied and tokenized on the worker thread."""
        texts = [m.text() for m in messages]  # validates the content parts
        self.refuse_if_too_long("".join(texts), 0)  # the rendered text holds every message
        return list(await self._run(partial(chat_prompt, self._tokenizer, messages)))

    async def _run(self, fn: partial[Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _longest_token_bytes(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab()
    return max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=1)


def _may_shrink(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is None or backend.normalizer is not None


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError("the prompt is not valid Unicode (a lone surrogate)") from exc
