"""What the sync and the async client share: settings, the API calls, retry decisions, parsing.

Each public method is one `APICall` built here; the clients only send it (with retries) and
validate the answer into a `_types` model, so both clients stay line-for-line alike.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict
from urllib.parse import quote

import httpx

from clients import _constants as C
from clients._exceptions import make_status_error, parse_retry_after
from clients._types import Health, NotGiven, Readiness
from clients._uploads import FilePart, PrefixSource, file_parts

TimeoutTypes = float | httpx.Timeout | None


class RequestOptions(TypedDict, total=False):
    """Per-call options every method accepts as keyword arguments."""

    timeout: TimeoutTypes  # replaces the client's timeout for this call
    max_retries: int  # replaces the client's max_retries for this call
    request_id: str  # sent as X-Request-ID (the server echoes it, and logs it)


@dataclass(frozen=True)
class APICall:
    """One HTTP call, as the endpoint functions below describe it."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    data: dict[str, str] | None = None  # multipart form fields
    files: list[FilePart] | None = None
    headers: dict[str, str] | None = None  # besides the client's own (auth, user agent)
    # Safe to resend after the request may have reached the server (no side effect, or the same
    # one twice). Calls that are not are retried only when the connection was never made.
    idempotent: bool = True
    accept: frozenset[int] = field(default_factory=frozenset)  # error statuses read as answers


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(C.BASE_URL_ENV) or C.DEFAULT_BASE_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get(C.API_KEY_ENV) or None


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"prefix-serve-python/{C.SDK_VERSION}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def request_kwargs(
    call: APICall, options: RequestOptions, base_url: str, headers: dict[str, str],
    timeout: TimeoutTypes,
) -> dict[str, Any]:
    """Keyword arguments for `build_request` (the same for httpx's sync and async clients)."""
    headers = {**headers, **(call.headers or {})}
    if "request_id" in options:
        headers["X-Request-ID"] = options["request_id"]
    return {
        "method": call.method, "url": base_url + call.path, "json": call.json,
        "params": call.params, "data": call.data, "files": call.files, "headers": headers,
        "timeout": options.get("timeout", timeout),
    }


# --- retries ------------------------------------------------------------------------------------

_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def delay_after_error(
    exc: httpx.TransportError, call: APICall, attempt: int, max_retries: int
) -> float | None:
    """Seconds to wait before retrying after a transport error, or None to give up."""
    if attempt >= max_retries:
        return None
    if not call.idempotent and not isinstance(exc, _NEVER_SENT):
        return None
    return backoff(attempt)


def delay_after_response(response: httpx.Response, attempt: int, max_retries: int) -> float | None:
    """Seconds to wait before retrying after an error status, or None to give up."""
    if attempt >= max_retries or response.status_code not in C.RETRY_STATUSES:
        return None
    retry_after = parse_retry_after(response.headers)
    if retry_after is not None:
        return min(retry_after, C.MAX_RETRY_AFTER)
    return backoff(attempt)


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: INITIAL * 2**attempt (capped), minus up to JITTER of it."""
    delay = min(C.INITIAL_RETRY_DELAY * 2.0**attempt, C.MAX_RETRY_DELAY)
    return delay * (1.0 - C.RETRY_JITTER * random.random())


def is_answer(response: httpx.Response, call: APICall) -> bool:
    return response.is_success or response.status_code in call.accept


def status_error(response: httpx.Response) -> Exception:
    """The mapped exception for an error response whose body has been read."""
    return make_status_error(response, _body(response))


def _body(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return response.text


# --- the API calls ------------------------------------------------------------------------------


def generate_call(
    prefix_id: str | None, prompt: str, sampling: dict[str, Any], tenant: str | None, *,
    stream: bool,
) -> APICall:
    body = {"prefix_id": prefix_id, "prompt": prompt, "stream": stream}
    body.update({key: value for key, value in sampling.items() if value is not None})
    # The operator key names the tenant whose prefixes a generation uses in `X-Tenant`.
    headers = {"X-Tenant": tenant} if tenant is not None else None
    return APICall("POST", "/generate", json=body, headers=headers)


def sampling_args(
    max_new_tokens: int | None, temperature: float | None, top_p: float | None,
    top_k: int | None, stop: str | Sequence[str] | None, seed: int | None,
) -> dict[str, Any]:
    stops = [stop] if isinstance(stop, str) else (list(stop) if stop is not None else None)
    return {
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "top_k": top_k, "stop": stops, "seed": seed,
    }


def upload_call(
    name: str, source: PrefixSource, description: str | None, tenant: str | None
) -> APICall:
    data = {"name": name}
    if description is not None:
        data["description"] = description
    if tenant is not None:
        data["tenant"] = tenant
    return APICall("POST", "/admin/prefixes", data=data, files=file_parts(source), idempotent=False)


def list_prefixes_call(tenant: str | None, cursor: str | None, limit: int) -> APICall:
    params = _params(tenant=tenant, cursor=cursor, limit=limit)
    return APICall("GET", "/admin/prefixes", params=params)


def get_prefix_call(name: str, tenant: str | None) -> APICall:
    return APICall("GET", f"/admin/prefixes/{_seg(name)}", params=_params(tenant=tenant))


def delete_prefix_call(name: str, version: int | None, tenant: str | None) -> APICall:
    params = _params(version=version, tenant=tenant)
    return APICall("DELETE", f"/admin/prefixes/{_seg(name)}", params=params)


def create_tenant_call(name: str) -> APICall:
    return APICall("POST", "/admin/tenants", json={"name": name}, idempotent=False)


def list_tenants_call() -> APICall:
    return APICall("GET", "/admin/tenants")


def create_key_call(tenant: str) -> APICall:
    return APICall("POST", f"/admin/tenants/{_seg(tenant)}/keys", idempotent=False)


def revoke_key_call(tenant: str, key_id: str) -> APICall:
    return APICall("DELETE", f"/admin/tenants/{_seg(tenant)}/keys/{_seg(key_id)}")


QUOTA_FIELDS = ("weight", "max_running", "max_queued", "tokens_per_minute", "max_prefixes",
                "max_stored_bytes")


def get_quota_call(tenant: str) -> APICall:
    return APICall("GET", f"/admin/tenants/{_seg(tenant)}/quota")


def set_quota_call(tenant: str, fields: dict[str, Any]) -> APICall:
    """PATCH the fields that were given (NOT_GIVEN ones are left out; None clears). Setting the
    same values twice is the same as once, so it is safe to retry."""
    changes = {key: value for key, value in fields.items() if not isinstance(value, NotGiven)}
    unknown = set(changes) - set(QUOTA_FIELDS)
    if unknown:
        raise TypeError(f"unknown quota fields: {', '.join(sorted(unknown))}")
    return APICall("PATCH", f"/admin/tenants/{_seg(tenant)}/quota", json=changes)


def delete_tenant_call(tenant: str) -> APICall:
    return APICall("DELETE", f"/admin/tenants/{_seg(tenant)}")


def health_call() -> APICall:
    # A 503 from /health is the answer "the engine is dead" (restart the server), not a fault.
    return APICall("GET", "/health", accept=frozenset({503}))


def ready_call() -> APICall:
    # A 503 from /ready is the answer "not ready" (with the failing checks), not a fault to retry.
    return APICall("GET", "/ready", accept=frozenset({503}))


def parse_health(response: httpx.Response) -> Health:
    body = _body(response)
    if isinstance(body, dict) and "status" in body:
        return Health.model_validate(body)
    raise status_error(response)


def parse_readiness(response: httpx.Response) -> Readiness:
    body = _body(response)
    if isinstance(body, dict) and "status" in body:
        return Readiness.model_validate(body)
    raise status_error(response)  # a 503 in the error format: shutting down, say


def _seg(value: str) -> str:
    return quote(value, safe="")


def _params(**params: Any) -> dict[str, Any]:
    return {key: value for key, value in params.items() if value is not None}
