"""Prompts to token ids off the event loop, fairly between tenants, and over-long prompts refused
before any per-item work.

Tokenizing a 1 MB prompt takes a good part of a second (far more when a long vocabulary entry lets
the length check below pass); on the event loop it would stall every other request (and
`/health`). The routes encode in a `TokenizerPool` instead: `--tokenizer-threads` threads sharing
the tokenizer (the Rust encoder releases the GIL, so the loop runs on meanwhile; encoding only
reads the tokenizer: nothing on the serving path sets truncation or padding, the one thing that
would make concurrent calls unsafe). Each tenant's calls wait in its own
FIFO queue and a tenant has at most one call running, the queues served round-robin: one
tenant's long prompts queue behind each other, never in front of another tenant's.

Before that, a prompt whose byte length already proves it cannot fit the context is refused
without tokenizing it: no token covers more bytes of text than the longest token in the vocabulary
(its UTF-8 spelling: byte-level BPE spells each byte in one or two bytes, SentencePiece's `▁` in
three), so a prompt of B bytes has at least B / longest tokens. A tokenizer with a normalizer may
shrink the text first (NFC composes up to 3 bytes into 1 for some Hangul; NFKC maps a 3-byte
full-width letter to 1 byte), so then the bound is divided by 4 more. The bound only ever refuses
what the exact count would refuse too; the engine checks the exact count. Lists (token ids,
messages) longer than the context are refused by their length, before they are validated.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from server.api.chat_template import chat_prompt, require_chat_template
from server.api.openai_schemas import ChatMessage
from server.engine.checks import check_unicode
from server.errors import ContextLengthError

NORMALIZER_SHRINK = 4


TokenizerCall = Callable[[Any], Any]  # called with the tokenizer


@dataclass
class _Job:
    call: TokenizerCall
    future: asyncio.Future[Any]


class TokenizerPool:
    """Tokenizer calls on worker threads: per-tenant FIFO queues served round-robin, at most one
    running call per tenant. Used from the event loop's thread only."""

    def __init__(self, tokenizer: Any, threads: int) -> None:
        self._tokenizer = tokenizer
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="prefix-serve-tok")
        self._free = threads
        self._waiting: dict[str, deque[_Job]] = {}  # tenants with queued calls, in turn order
        self._running: set[str] = set()  # tenants with a call on a thread

    async def run(self, tenant: str, call: TokenizerCall) -> Any:
        """`call(tokenizer)` on a worker thread, when `tenant`'s turn comes."""
        job = _Job(call, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(tenant, deque()).append(job)
        self._dispatch()
        return await job.future

    def _dispatch(self) -> None:
        while self._free > 0:
            tenant = next((t for t in self._waiting if t not in self._running), None)
            if tenant is None:
                return
            jobs = self._waiting.pop(tenant)  # and back at the end of the turn order if more
            job = jobs.popleft()
            if jobs:
                self._waiting[tenant] = jobs
            if job.future.done():  # its request went away while it waited
                continue
            self._free -= 1
            self._running.add(tenant)
            done = asyncio.wrap_future(self._executor.submit(job.call, self._tokenizer))
            done.add_done_callback(partial(self._finished, tenant, job))

    def _finished(self, tenant: str, job: _Job, done: asyncio.Future[Any]) -> None:
        self._free += 1
        self._running.discard(tenant)
        if job.future.done():
            pass  # its request went away meanwhile
        elif done.cancelled():
            job.future.cancel()  # the pool closed
        elif (error := done.exception()) is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(done.result())
        self._dispatch()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class PromptEncoder:
    def __init__(self, tokenizer: Any, context: int, threads: int = 1) -> None:
        self._tokenizer = tokenizer
        self.context = context  # at least the engine's: the engine refuses by the exact count
        self.bytes_per_token = max(1, _longest_token_bytes(tokenizer))
        if _may_shrink(tokenizer):
            self.bytes_per_token *= NORMALIZER_SHRINK
        self._pool = TokenizerPool(tokenizer, threads)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, from its length alone."""
        return math.ceil(len(text.encode("utf-8", "surrogatepass")) / self.bytes_per_token)

    def refuse_long_lists(self, body: object) -> None:
        """Refuse a parsed JSON body whose prompt lists cannot fit, by their lengths alone.

        Runs before the body is validated item by item: a list of token ids longer than the
        context (no prefix, no output) can never be served, and validating a million ids costs
        about 0.1 s of the event loop. Messages likewise: each renders at least one token."""
        if not isinstance(body, dict):
            return  # the schema refuses it
        for field in ("prompt", "messages"):
            items = body.get(field)
            if isinstance(items, list) and len(items) > self.context:
                raise ContextLengthError(
                    f"{field} has {len(items)} items: more than the context of {self.context} "
                    "tokens holds"
                )
        prompts = body.get("prompt")  # a batch of token-id lists: each one by its length
        if isinstance(prompts, list):
            for index, ids in enumerate(prompts):
                if isinstance(ids, list) and len(ids) > self.context:
                    raise ContextLengthError(
                        f"prompt {index} has {len(ids)} token ids: more than the context of "
                        f"{self.context} tokens holds"
                    )

    def refuse_if_too_long(self, text: str, reserved: int) -> None:
        """ContextLengthError when `text` plus `reserved` tokens (prefix + output) cannot fit."""
        least = self.min_tokens(text)
        if least + reserved > self.context:
            raise ContextLengthError(
                f"the prompt ({len(text)} characters: at least {least} "
                f"token{'' if least == 1 else 's'}) with the prefix and the tokens to generate "
                f"({reserved} together) exceeds the model's context of {self.context} tokens"
            )

    async def encode(self, text: str, *, tenant: str, add_special_tokens: bool,
                     reserved: int) -> list[int]:
        """Token ids of `text` (refused first if it cannot fit), encoded in `tenant`'s turn."""
        check_unicode(text, "the prompt")
        self.refuse_if_too_long(text, reserved)
        encode = partial(_encode, text=text, add_special_tokens=add_special_tokens)
        return list(await self._pool.run(tenant, encode))

    async def chat(self, messages: Sequence[ChatMessage], *, tenant: str) -> list[int]:
        """The chat template applied and tokenized in `tenant`'s turn."""
        require_chat_template(self._tokenizer)
        texts = [m.text() for m in messages]  # validates the content parts
        self.refuse_if_too_long("".join(texts), 0)  # the rendered text holds every message
        return list(await self._pool.run(tenant, partial(_chat, messages=messages)))

    def close(self) -> None:
        self._pool.close()


def _encode(tokenizer: Any, *, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _chat(tokenizer: Any, *, messages: Sequence[ChatMessage]) -> list[int]:
    return chat_prompt(tokenizer, messages)


def _longest_token_bytes(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab()
    return max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=1)


def _may_shrink(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is None or backend.normalizer is not None
