"""Chat completions' defaults that need the services (the prompt itself: chat_template.py)."""

from __future__ import annotations

from server.api.state import Services

DEFAULT_CHAT_MAX_TOKENS = 256  # when the client sets neither max_tokens nor max_completion_tokens


async def default_max_tokens(
    services: Services, tenant: str, prefix_ref: str | None, prompt_len: int
) -> int:
    """Up to DEFAULT_CHAT_MAX_TOKENS, but no more than what the context has room for."""
    prefix_len = 0
    if prefix_ref is not None:
        prefix_len = (await services.resolver.resolve(tenant, prefix_ref)).prefix_len
    limit = services.settings.max_seq_len or services.loaded.max_context
    return max(1, min(DEFAULT_CHAT_MAX_TOKENS, limit - prefix_len - prompt_len))
