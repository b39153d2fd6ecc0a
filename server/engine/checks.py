"""What `Engine.submit` refuses before a request ever runs: bad sampling values, empty or
out-of-vocabulary prompts, work that cannot fit the slot / the model's context, and a prefix that
breaks the engine's own invariants (the last is the server's fault: `CorruptPrefixError`).

Every field is checked here again, whatever the HTTP schema already bounded: a value that passes
`submit` must never fail the engine's step (where one request's error would reach everyone).
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import PreTrainedTokenizerBase

from server.engine.fairness import check_share
from server.engine.memory import PoolPlan
from server.engine.request import EngineRequest, SamplingParams, TenantShare
from server.errors import ContextLengthError, CorruptPrefixError, InvalidRequestError

log = logging.getLogger(__name__)

MAX_SEED = 2**64 - 1  # inclusive: torch.Generator.manual_seed takes [-2**63, 2**64), where a
# negative seed s is the same stream as 2**64 + s, so [0, 2**64) offers every stream once
MAX_STOP_STRINGS = 16  # stop strings per request
MAX_STOP_STRING_CHARS = 256  # each: the detokenizer matches every one after every token
MAX_STOP_TOKEN_IDS = 64


def check_sampling(params: SamplingParams) -> None:
    if not _is_int(params.max_new_tokens) or params.max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, got "
                                  f"{_short(params.max_new_tokens)}")
    if not _is_number(params.temperature) or not 0 <= params.temperature < math.inf:
        raise InvalidRequestError(f"temperature must be a finite number >= 0, got "
                                  f"{_short(params.temperature)}")
    if not _is_number(params.top_p) or not 0 < params.top_p <= 1:  # also refuses NaN
        raise InvalidRequestError(f"top_p must be in (0, 1], got {_short(params.top_p)}")
    if not _is_int(params.top_k) or params.top_k < 0:  # beyond the vocabulary it is off
        raise InvalidRequestError(f"top_k must be an integer >= 0 (0 = off), got "
                                  f"{_short(params.top_k)}")
    if params.seed is not None and (not _is_int(params.seed) or not 0 <= params.seed <= MAX_SEED):
        raise InvalidRequestError(f"seed must be an integer in [0, 2**64), got "
                                  f"{_short(params.seed)}")
    _check_stops(params)


def check_prefix(request: EngineRequest) -> None:
    """The prefix's own invariants, which the block manager and attention rely on: a length
    >= 1, and tensors of a known form that hold exactly that many tokens. Shapes against the
    model are checked when its K/V are computed (`prefixes.py`), failing its requests alone."""
    prefix = request.prefix
    if prefix is None:
        return
    why = _prefix_fault(prefix.form, prefix.prefix_len, prefix.tensors)
    if why is not None:
        log.warning("corrupt prefix %r v%s (%s) of tenant %r refused at the engine: %s",
                    prefix.name, prefix.version, prefix.content_hash[:12], request.tenant.name,
                    why)
        raise CorruptPrefixError(f"prefix {prefix.name!r} v{prefix.version} is corrupt: {why}")


def _prefix_fault(form: str, length: int, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why these fields cannot be a prefix of `length` tokens (None when they can)."""
    if not _is_int(length) or length < 1:
        return f"its length must be an integer >= 1, got {_short(length)}"
    names = {"p_theta": ("p_theta",), "kv": ("keys", "values")}.get(form)
    if names is None:
        return f"unknown form {_short(form)}"
    held = tensors if isinstance(tensors, dict) else {}
    found = [t for t in (held.get(n) for n in names) if isinstance(t, torch.Tensor)]
    if len(found) != len(names):
        return f"a {form!r} prefix needs the tensors {', '.join(names)}"
    dims, axis = (3, 1) if form == "p_theta" else (4, 2)  # p_theta [L, P, d]; K/V [L, H, P, hd]
    for name, tensor in zip(names, found, strict=True):
        if tensor.dim() != dims or tensor.shape[axis] != length:
            return f"{name} of shape {list(tensor.shape)} does not hold {length} tokens"
    if found[0].shape != found[-1].shape:
        return "keys and values differ in shape"
    return None


def _check_stops(params: SamplingParams) -> None:
    stops = params.stop
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS for s in stops):
        raise InvalidRequestError(
            f"stop strings must be non-empty strings of at most {MAX_STOP_STRING_CHARS} characters"
        )
    for s in stops:
        check_unicode(s, "a stop string")
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
        _is_int(t) for t in params.stop_token_ids
    ):
        raise InvalidRequestError(f"at most {MAX_STOP_TOKEN_IDS} integer stop token ids")


def prompt_ids(
    request: EngineRequest, tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> list[int]:
    """The prompt as token ids: text is tokenized, ids are checked against the vocabulary."""
    if isinstance(request.prompt, str):
        if not request.prompt:
            raise InvalidRequestError("prompt is empty")
        check_unicode(request.prompt, "prompt")
        ids = list(tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
    else:
        ids = list(request.prompt)
    if not ids:
        raise InvalidRequestError("prompt is empty")
    bad = [t for t in ids if not _is_int(t) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"prompt token ids out of the vocabulary [0, {vocab_size}): "
            f"{_short([_short(t) for t in bad[:5]])}"
        )
    for t in request.sampling.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"stop token id {_short(t)} is out of the vocabulary")
    return ids


def check_fits(request: EngineRequest, num_prompt: int, pool: PoolPlan) -> None:
    """prefix + prompt + max_new_tokens must fit `max_seq_len` (<= the model's context), and
    the request alone must fit the KV pool, so nothing admitted can ever run out of room."""
    prefix = request.prefix.prefix_len if request.prefix is not None else 0
    need = prefix + num_prompt + request.sampling.max_new_tokens
    if need > pool.max_seq_len:
        raise ContextLengthError(
            f"prefix ({prefix}) + prompt ({num_prompt}) + max_new_tokens "
            f"({request.sampling.max_new_tokens}) = {need} tokens exceeds this server's "
            f"context of {pool.max_seq_len} tokens"
        )
    # The last sampled token is never fed back, so its K/V never need a slot.
    own = num_prompt + request.sampling.max_new_tokens - 1
    blocks = pool.blocks_for(prefix) + pool.blocks_for(own)
    if blocks > pool.num_blocks:
        raise ContextLengthError(
            f"this request needs {blocks} KV blocks but the server's pool holds "
            f"{pool.num_blocks}; shorten it (the operator can raise --kv-cache-mb)"
        )


def check_unicode(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: the tokenizer would raise TypeError
        raise InvalidRequestError(f"{what} is not valid Unicode (a lone surrogate)") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: object, limit: int = 40) -> str:
    """A value for an error message, cut short (a huge integer must not be echoed whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_tenant(share: TenantShare) -> None:
    try:
        check_share(share)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
