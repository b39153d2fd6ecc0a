"""`PrefixClient`, the blocking client (`AsyncPrefixClient` in `_async_client` is its twin).

Both send each call with retries (connection errors, 429 honouring `Retry-After`, 503; exponential
backoff with jitter; never once a stream has started yielding) and raise the `_exceptions` tree.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack

import httpx

from clients import _base as B
from clients._constants import DEFAULT_MAX_RETRIES, DEFAULT_PAGE_SIZE, DEFAULT_TIMEOUT
from clients._exceptions import make_connection_error
from clients._streaming import GenerationStream
from clients._types import (
    NOT_GIVEN,
    ApiKey,
    Generation,
    Health,
    NotGiven,
    PrefixDetail,
    PrefixInfo,
    PrefixPage,
    Readiness,
    Tenant,
    TenantDeletion,
    TenantQuota,
)
from clients._uploads import PrefixSource

_sleep = time.sleep  # a module attribute, so tests can record the retry delays


class ClientOptions(TypedDict, total=False):
    timeout: B.TimeoutTypes
    max_retries: int


class _ClientBase:
    def __init__(
        self, base_url: str | None, api_key: str | None, timeout: B.TimeoutTypes, max_retries: int
    ) -> None:
        self.base_url = B.resolve_base_url(base_url)
        self.api_key = B.resolve_api_key(api_key)
        self.timeout = timeout
        self.max_retries = max_retries
        self._headers = B.default_headers(self.api_key)
        self._owns_http = True

    def with_options(self, **options: Unpack[ClientOptions]) -> Self:
        """A copy with another timeout and/or max_retries that shares this client's connections."""
        clone = copy.copy(self)
        clone._owns_http = False  # closing the copy must not close the original's pool
        clone.timeout = options.get("timeout", self.timeout)
        clone.max_retries = options.get("max_retries", self.max_retries)
        return clone

    def _kwargs(self, call: B.APICall, options: B.RequestOptions) -> dict[str, Any]:
        return B.request_kwargs(call, options, self.base_url, self._headers, self.timeout)

    def _retries(self, options: B.RequestOptions) -> int:
        return options.get("max_retries", self.max_retries)


class PrefixClient(_ClientBase):
    """Blocking client of a prefix-serve server.

    Args:
        base_url: defaults to $PREFIX_SERVE_BASE_URL, then http://127.0.0.1:8000.
        api_key: a tenant key or the operator key; defaults to $PREFIX_SERVE_API_KEY.
        timeout: seconds or an `httpx.Timeout` (default `DEFAULT_TIMEOUT`: 5 s to connect).
        max_retries: retries after a connection error, 429 or 503 (default 2).
        http_client / transport: bring your own `httpx.Client` (not closed by this client), or
            a transport for the one built here.
    Every method also takes the per-call options `timeout`, `max_retries` and `request_id`.
    """

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, *,
        timeout: B.TimeoutTypes = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None, transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(transport=transport, timeout=timeout)

    def generate(
        self, prefix_id: str | None, prompt: str, *, max_new_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        stop: str | Sequence[str] | None = None, seed: int | None = None,
        tenant: str | None = None, **options: Unpack[B.RequestOptions],
    ) -> Generation:
        """Generate a completion of `prompt` steered by prefix `prefix_id` ("name", "name@3",
        or None for the base model). Unset sampling arguments take the server's defaults
        (greedy, 64 new tokens). `tenant`: with the operator key, whose prefixes to use."""
        sampling = B.sampling_args(max_new_tokens, temperature, top_p, top_k, stop, seed)
        call = B.generate_call(prefix_id, prompt, sampling, tenant, stream=False)
        return Generation.model_validate(self._json(call, options))

    def stream(
        self, prefix_id: str | None, prompt: str, *, max_new_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        stop: str | Sequence[str] | None = None, seed: int | None = None,
        tenant: str | None = None, **options: Unpack[B.RequestOptions],
    ) -> GenerationStream:
        """Like `generate`, streamed: iterate the returned stream for text deltas as they are
        made, then read `.result`. Errors before the first delta raise here (after retries)."""
        sampling = B.sampling_args(max_new_tokens, temperature, top_p, top_k, stop, seed)
        call = B.generate_call(prefix_id, prompt, sampling, tenant, stream=True)
        return GenerationStream(self._send(call, options, stream=True))

    def upload_prefix(
        self, name: str, source: PrefixSource, *, description: str | None = None,
        tenant: str | None = None, **options: Unpack[B.RequestOptions],
    ) -> PrefixInfo:
        """Store `source` (a file, a PEFT adapter directory, or tensors in memory: see
        `clients._uploads`) as the next version of prefix `name`. `tenant`: operator key only."""
        call = B.upload_call(name, source, description, tenant)
        return PrefixInfo.model_validate(self._json(call, options))

    def list_prefixes(
        self, *, tenant: str | None = None, page_size: int = DEFAULT_PAGE_SIZE,
        **options: Unpack[B.RequestOptions],
    ) -> Iterator[PrefixInfo]:
        """Every prefix (latest versions), fetched page by page as the iterator advances."""
        cursor: str | None = None
        while True:
            body = self._json(B.list_prefixes_call(tenant, cursor, page_size), options)
            page = PrefixPage.model_validate(body)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def get_prefix(
        self, name: str, *, tenant: str | None = None, **options: Unpack[B.RequestOptions]
    ) -> PrefixDetail:
        """The latest version of prefix `name`, with every stored version in `.versions`."""
        return PrefixDetail.model_validate(self._json(B.get_prefix_call(name, tenant), options))

    def delete_prefix(
        self, name: str, *, version: int | None = None, tenant: str | None = None,
        **options: Unpack[B.RequestOptions],
    ) -> int:
        """Delete one version of prefix `name`, or all of them; returns how many were deleted."""
        body = self._json(B.delete_prefix_call(name, version, tenant), options)
        return int(body["deleted"])

    def create_tenant(self, name: str, **options: Unpack[B.RequestOptions]) -> ApiKey:
        """Create tenant `name` with a first key (operator key only; the key is shown once)."""
        return ApiKey.model_validate(self._json(B.create_tenant_call(name), options))

    def list_tenants(self, **options: Unpack[B.RequestOptions]) -> list[Tenant]:
        """Every tenant with its keys' ids (operator key only)."""
        body = self._json(B.list_tenants_call(), options)
        return [Tenant.model_validate(item) for item in body["items"]]

    def create_key(self, tenant: str, **options: Unpack[B.RequestOptions]) -> ApiKey:
        """A new key for `tenant` (operator key only; the key is shown once)."""
        return ApiKey.model_validate(self._json(B.create_key_call(tenant), options))

    def revoke_key(self, tenant: str, key_id: str, **options: Unpack[B.RequestOptions]) -> str:
        """Revoke key `key_id` of `tenant` (operator key only); returns the revoked key id."""
        return str(self._json(B.revoke_key_call(tenant, key_id), options)["revoked"])

    def get_quota(self, tenant: str, **options: Unpack[B.RequestOptions]) -> TenantQuota:
        """`tenant`'s quota in force, the fields set for it and its storage use (the operator
        key, or that tenant's own key)."""
        return TenantQuota.model_validate(self._json(B.get_quota_call(tenant), options))

    def set_quota(
        self, tenant: str, *, weight: float | None | NotGiven = NOT_GIVEN,
        max_running: int | None | NotGiven = NOT_GIVEN,
        max_queued: int | None | NotGiven = NOT_GIVEN,
        tokens_per_minute: int | None | NotGiven = NOT_GIVEN,
        max_prefixes: int | None | NotGiven = NOT_GIVEN,
        max_stored_bytes: int | None | NotGiven = NOT_GIVEN,
        **options: Unpack[B.RequestOptions],
    ) -> TenantQuota:
        """Set `tenant`'s quota fields (operator key only): a value sets one, None clears it
        (back to the server's default), a field left out is unchanged. Returns the new quota."""
        fields = dict(weight=weight, max_running=max_running, max_queued=max_queued,
                      tokens_per_minute=tokens_per_minute, max_prefixes=max_prefixes,
                      max_stored_bytes=max_stored_bytes)
        return TenantQuota.model_validate(self._json(B.set_quota_call(tenant, fields), options))

    def delete_tenant(
        self, name: str, **options: Unpack[B.RequestOptions]
    ) -> TenantDeletion:
        """Delete tenant `name` (operator key only): its keys stop working at once on every
        server, and its prefixes are deleted. Not undoable."""
        return TenantDeletion.model_validate(self._json(B.delete_tenant_call(name), options))

    def health(self, **options: Unpack[B.RequestOptions]) -> Health:
        """`/health`: the process is alive; `.ok == False` when its engine died (restart it)."""
        return B.parse_health(self._send(B.health_call(), options))

    def ready(self, **options: Unpack[B.RequestOptions]) -> Readiness:
        """`/ready`: model, engine and registry checks; a degraded server answers `.ok == False`."""
        return B.parse_readiness(self._send(B.ready_call(), options))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _json(self, call: B.APICall, options: B.RequestOptions) -> Any:
        return self._send(call, options).json()

    def _send(
        self, call: B.APICall, options: B.RequestOptions, *, stream: bool = False
    ) -> httpx.Response:
        max_retries, attempt = self._retries(options), 0
        while True:
            try:
                request = self._http.build_request(**self._kwargs(call, options))
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = B.delay_after_error(exc, call, attempt, max_retries)
                if delay is None:
                    raise make_connection_error(exc) from exc
            else:
                if B.is_answer(response, call):
                    return response
                delay = B.delay_after_response(response, attempt, max_retries)
                _read_and_close(response)
                if delay is None:
                    raise B.status_error(response)
            _sleep(delay)
            attempt += 1


def _read_and_close(response: httpx.Response) -> None:
    """Read an error response's body (a streamed one has not been read yet), then release it."""
    try:
        response.read()
    except httpx.TransportError as exc:
        raise make_connection_error(exc) from exc
    finally:
        response.close()
