"""prefix-serve's Python SDK: `PrefixClient` (blocking) and `AsyncPrefixClient`.

Needs only httpx and pydantic (plus numpy and safetensors to upload tensors from memory); it never
imports the server or torch. See docs/sdk.md.
"""

from clients._async_client import AsyncPrefixClient
from clients._base import RequestOptions
from clients._client import PrefixClient
from clients._constants import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    SDK_VERSION,
)
from clients._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    CorruptRecordError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PrefixServeError,
    QuotaExceededError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from clients._streaming import AsyncGenerationStream, GenerationStream
from clients._types import (
    NOT_GIVEN,
    ApiKey,
    Generation,
    Health,
    KeyInfo,
    PrefixDetail,
    PrefixInfo,
    PrefixRef,
    QuotaValues,
    Readiness,
    StorageUsage,
    Tenant,
    TenantDeletion,
    TenantQuota,
    Timings,
    Usage,
)
from clients._uploads import UploadSourceError

__version__ = SDK_VERSION

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "NOT_GIVEN",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "ApiKey",
    "AsyncGenerationStream",
    "AsyncPrefixClient",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "CorruptRecordError",
    "Generation",
    "GenerationStream",
    "Health",
    "InternalServerError",
    "KeyInfo",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PrefixClient",
    "PrefixDetail",
    "PrefixInfo",
    "PrefixRef",
    "PrefixServeError",
    "QuotaExceededError",
    "QuotaValues",
    "RateLimitError",
    "Readiness",
    "RequestOptions",
    "ServiceUnavailableError",
    "StorageUsage",
    "Tenant",
    "TenantQuota",
    "TenantDeletion",
    "Timings",
    "UnprocessableEntityError",
    "UploadSourceError",
    "Usage",
    "__version__",
]
