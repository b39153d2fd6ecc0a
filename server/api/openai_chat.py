"""Chat messages -> prompt token ids through the tokenizer's own chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

from server.api.openai_schemas import ChatMessage
from server.api.state import Services
from server.errors import InvalidRequestError

DEFAULT_CHAT_MAX_TOKENS = 256  # when the client sets neither max_tokens nor max_completion_tokens


def chat_prompt(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """The templated conversation with the assistant's turn opened, as token ids.

    The template writes any special tokens itself, so the text is encoded without adding more.
    """
    require_chat_template(tokenizer)
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as exc:
        raise InvalidRequestError(f"the chat template refused these messages: {exc}") from exc
    ids: list[int] = tokenizer(str(text), add_special_tokens=False)["input_ids"]
    return ids


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "the served model's tokenizer has no chat template, so /v1/chat/completions is not "
            "available; use /v1/completions with a plain prompt"
        )


async def default_max_tokens(
    services: Services, tenant: str, prefix_ref: str | None, prompt_len: int
) -> int:
    """Up to DEFAULT_CHAT_MAX_TOKENS, but no more than what the context has room for."""
    prefix_len = 0
    if prefix_ref is not None:
        prefix_len = (await services.resolver.resolve(tenant, prefix_ref)).prefix_len
    limit = services.settings.max_seq_len or services.loaded.max_context
    return max(1, min(DEFAULT_CHAT_MAX_TOKENS, limit - prefix_len - prompt_len))
