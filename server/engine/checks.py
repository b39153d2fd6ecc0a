"""What `Engine.submit` refuses before a request ever runs: bad sampling values, empty or
out-of-vocabulary prompts, and work that cannot fit the slot / the model's context."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from server.engine.request import EngineRequest, SamplingParams
from server.errors import ContextLengthError, InvalidRequestError


def check_sampling(params: SamplingParams) -> None:
    if params.max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if not params.temperature >= 0:  # also refuses NaN
        raise InvalidRequestError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0 (0 = off), got {params.top_k}")
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise InvalidRequestError("stop strings must be non-empty strings")


def prompt_ids(
    request: EngineRequest, tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> list[int]:
    """The prompt as token ids: text is tokenized, ids are checked against the vocabulary."""
    if isinstance(request.prompt, str):
        if not request.prompt:
            raise InvalidRequestError("prompt is empty")
        ids = list(tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
    else:
        ids = list(request.prompt)
    if not ids:
        raise InvalidRequestError("prompt is empty")
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"prompt token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}"
        )
    for t in request.sampling.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"stop token id {t} is out of the vocabulary")
    return ids


def check_context(request: EngineRequest, num_prompt: int, slot_len: int) -> None:
    """prefix + prompt + max_new_tokens must fit one KV slot (<= the model's context)."""
    prefix = request.prefix.prefix_len if request.prefix is not None else 0
    need = prefix + num_prompt + request.sampling.max_new_tokens
    if need > slot_len:
        raise ContextLengthError(
            f"prefix ({prefix}) + prompt ({num_prompt}) + max_new_tokens "
            f"({request.sampling.max_new_tokens}) = {need} tokens exceeds this server's "
            f"context of {slot_len} tokens"
        )
