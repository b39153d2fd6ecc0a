"""Chat messages -> prompt token ids through the tokenizer's own chat template.

Its own module so that both the prompt encoder (prompts.py, which the services hold) and the
OpenAI routes can import it without a circle through state.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

from server.api.openai_schemas import ChatMessage
from server.errors import InvalidRequestError


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
