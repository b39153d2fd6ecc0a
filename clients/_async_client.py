"""`AsyncPrefixClient`: `PrefixClient`'s methods as coroutines (and async iterators)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

import anyio
import httpx

from clients import _base as B
from clients._client import _ClientBase
from clients._constants import DEFAULT_MAX_RETRIES, DEFAULT_PAGE_SIZE, DEFAULT_TIMEOUT
from clients._exceptions import make_connection_error
from clients._streaming import AsyncGenerationStream
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

_asleep = anyio.sleep  # a module attribute, so tests can record the retry delays


class AsyncPrefixClient(_ClientBase):
    """Async client of a prefix-serve server; arguments and methods as `PrefixClient`'s
    (with an `httpx.AsyncClient` / `httpx.AsyncBaseTransport`)."""

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, *,
        timeout: B.TimeoutTypes = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(transport=transport, timeout=timeout)

    async def generate(
        self, prefix_id: str | None, prompt: str, *, max_new_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        stop: str | Sequence[str] | None = None, seed: int | None = None,
        tenant: str | None = None, **options: Unpack[B.RequestOptions],
    ) -> Generation:
        """See `PrefixClient.generate`."""
        sampling = B.sampling_args(max_new_tokens, temperature, top_p, top_k, stop, seed)
        call = B.generate_call(prefix_id, prompt, sampling, tenant, stream=False)
        return Generation.model_validate(await self._json(call, options))

    async def stream(
        self, prefix_id: str | None, prompt: str, *, max_new_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        stop: str | Sequence[str] | None = None, seed: int | None = None,
        tenant: str | None = None, **options: Unpack[B.RequestOptions],
    ) -> AsyncGenerationStream:
        """See `PrefixClient.stream`: `async for delta in await client.stream(...)`."""
        sampling = B.sampling_args(max_new_tokens, temperature, top_p, top_k, stop, seed)
        call = B.generate_call(prefix_id, prompt, sampling, tenant, stream=True)
        return AsyncGenerationStream(await self._send(call, options, stream=True))

    async def upload_prefix(
        self, name: str, source: PrefixSource, *, description: str | None = None,
        tenant: str | None = None, **options: Unpack[B.RequestOptions],
    ) -> PrefixInfo:
        """See `PrefixClient.upload_prefix`."""
        call = B.upload_call(name, source, description, tenant)
        return PrefixInfo.model_validate(await self._json(call, options))

    async def list_prefixes(
        self, *, tenant: str | None = None, page_size: int = DEFAULT_PAGE_SIZE,
        **options: Unpack[B.RequestOptions],
    ) -> AsyncIterator[PrefixInfo]:
        """See `PrefixClient.list_prefixes`: `async for info in client.list_prefixes()`."""
        cursor: str | None = None
        while True:
            body = await self._json(B.list_prefixes_call(tenant, cursor, page_size), options)
            page = PrefixPage.model_validate(body)
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def get_prefix(
        self, name: str, *, tenant: str | None = None, **options: Unpack[B.RequestOptions]
    ) -> PrefixDetail:
        """See `PrefixClient.get_prefix`."""
        call = B.get_prefix_call(name, tenant)
        return PrefixDetail.model_validate(await self._json(call, options))

    async def delete_prefix(
        self, name: str, *, version: int | None = None, tenant: str | None = None,
        **options: Unpack[B.RequestOptions],
    ) -> int:
        """See `PrefixClient.delete_prefix`."""
        body = await self._json(B.delete_prefix_call(name, version, tenant), options)
        return int(body["deleted"])

    async def create_tenant(self, name: str, **options: Unpack[B.RequestOptions]) -> ApiKey:
        """See `PrefixClient.create_tenant`."""
        return ApiKey.model_validate(await self._json(B.create_tenant_call(name), options))

    async def list_tenants(self, **options: Unpack[B.RequestOptions]) -> list[Tenant]:
        """See `PrefixClient.list_tenants`."""
        body = await self._json(B.list_tenants_call(), options)
        return [Tenant.model_validate(item) for item in body["items"]]

    async def create_key(self, tenant: str, **options: Unpack[B.RequestOptions]) -> ApiKey:
        """See `PrefixClient.create_key`."""
        return ApiKey.model_validate(await self._json(B.create_key_call(tenant), options))

    async def revoke_key(
        self, tenant: str, key_id: str, **options: Unpack[B.RequestOptions]
    ) -> str:
        """See `PrefixClient.revoke_key`."""
        return str((await self._json(B.revoke_key_call(tenant, key_id), options))["revoked"])

    async def get_quota(self, tenant: str, **options: Unpack[B.RequestOptions]) -> TenantQuota:
        """See `PrefixClient.get_quota`."""
        return TenantQuota.model_validate(await self._json(B.get_quota_call(tenant), options))

    async def set_quota(
        self, tenant: str, *, weight: float | None | NotGiven = NOT_GIVEN,
        max_running: int | None | NotGiven = NOT_GIVEN,
        max_queued: int | None | NotGiven = NOT_GIVEN,
        tokens_per_minute: int | None | NotGiven = NOT_GIVEN,
        max_prefixes: int | None | NotGiven = NOT_GIVEN,
        max_stored_bytes: int | None | NotGiven = NOT_GIVEN,
        **options: Unpack[B.RequestOptions],
    ) -> TenantQuota:
        """See `PrefixClient.set_quota`."""
        fields = dict(weight=weight, max_running=max_running, max_queued=max_queued,
                      tokens_per_minute=tokens_per_minute, max_prefixes=max_prefixes,
                      max_stored_bytes=max_stored_bytes)
        call = B.set_quota_call(tenant, fields)
        return TenantQuota.model_validate(await self._json(call, options))

    async def delete_tenant(
        self, name: str, **options: Unpack[B.RequestOptions]
    ) -> TenantDeletion:
        """See `PrefixClient.delete_tenant`."""
        body = await self._json(B.delete_tenant_call(name), options)
        return TenantDeletion.model_validate(body)

    async def health(self, **options: Unpack[B.RequestOptions]) -> Health:
        """See `PrefixClient.health`."""
        return B.parse_health(await self._send(B.health_call(), options))

    async def ready(self, **options: Unpack[B.RequestOptions]) -> Readiness:
        """See `PrefixClient.ready`."""
        return B.parse_readiness(await self._send(B.ready_call(), options))

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _json(self, call: B.APICall, options: B.RequestOptions) -> Any:
        return (await self._send(call, options)).json()

    async def _send(
        self, call: B.APICall, options: B.RequestOptions, *, stream: bool = False
    ) -> httpx.Response:
        max_retries, attempt = self._retries(options), 0
        while True:
            try:
                request = self._http.build_request(**self._kwargs(call, options))
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = B.delay_after_error(exc, call, attempt, max_retries)
                if delay is None:
                    raise make_connection_error(exc) from exc
            else:
                if B.is_answer(response, call):
                    return response
                delay = B.delay_after_response(response, attempt, max_retries)
                await _read_and_close(response)
                if delay is None:
                    raise B.status_error(response)
            await _asleep(delay)
            attempt += 1


async def _read_and_close(response: httpx.Response) -> None:
    """Read an error response's body (a streamed one has not been read yet), then release it."""
    try:
        await response.aread()
    except httpx.TransportError as exc:
        raise make_connection_error(exc) from exc
    finally:
        await response.aclose()
