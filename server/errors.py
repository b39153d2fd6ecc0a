"""The server's one error tree.

Each error carries the HTTP status and a machine-readable `type`; `server/api/errors.py` renders
every one of them as `{"error": {"type": ..., "message": ...}}`. The engine raises these too (it
knows the classes, not HTTP). `RequestError`s fail one request; `FatalEngineError` means the
engine is dead and the server is not ready.

The registry's errors (`prefix_registry.errors`: not found, conflict, quota exceeded, registry
unavailable...) are defined there only, since the registry cannot import the server; the one HTTP
mapping in `server/api/errors.py` gives each its status and type. They are re-exported here so
the server names every error it raises from one place.
"""

from __future__ import annotations

from prefix_registry.errors import ConflictError as ConflictError
from prefix_registry.errors import NotFoundError as NotFoundError
from prefix_registry.errors import QuotaExceededError as QuotaExceededError
from prefix_registry.errors import RegistryUnavailableError as RegistryUnavailableError


class ServeError(Exception):
    status_code: int = 500
    type: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(ServeError):
    """One request failed; everything else goes on."""


class InvalidRequestError(RequestError):
    status_code = 400
    type = "invalid_request"


class ContextLengthError(InvalidRequestError):
    type = "context_length_exceeded"


class AuthenticationError(RequestError):
    status_code = 401
    type = "authentication_error"


class PermissionDeniedError(RequestError):
    status_code = 403
    type = "permission_denied"


class PayloadTooLargeError(RequestError):
    status_code = 413
    type = "payload_too_large"


class ValidationError(RequestError):
    status_code = 422
    type = "validation_error"


class IncompatiblePrefixError(ValidationError):
    type = "incompatible_prefix"


class OverloadedError(RequestError):
    status_code = 429
    type = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(OverloadedError):
    """This tenant used its tokens per minute; other tenants are not affected."""

    type = "rate_limited"


class TenantQueueFullError(OverloadedError):
    """This tenant has its most requests waiting; other tenants are not affected."""

    type = "tenant_queue_full"


class TooManyUploadsError(OverloadedError):
    """Prefix uploads are held in memory while they are read and imported: their number is
    bounded, in all and per tenant (`--max-concurrent-uploads[-per-tenant]`)."""

    type = "too_many_uploads"


class CorruptRecordError(RequestError):
    """A record read back from the registry is inconsistent: the server's data is bad, so it is a
    500 (retrying will not help until an operator deletes or re-uploads it), never a 4xx blaming
    the caller. Only the request that read the record fails."""

    status_code = 500
    type = "corrupt_record"


class NonFiniteOutputError(RequestError):
    """The request's own logits came out NaN/inf (its prefix's values overflow the model): it
    alone fails, and the KV blocks it wrote are zeroed before anyone else gets them."""

    type = "non_finite_output"


class CorruptPrefixError(RequestError):
    """A prefix handed to the engine breaks its invariants (length < 1, tensors that do not
    hold its length): the server's data is at fault, never the client's; only its request
    fails."""

    type = "corrupt_prefix"


class UnavailableError(ServeError):
    status_code = 503
    type = "unavailable"


class ShuttingDownError(UnavailableError):
    type = "shutting_down"


class FatalEngineError(UnavailableError):
    """The engine loop died; no request can be served until restart."""

    type = "engine_dead"


class ReplicaUnavailableError(UnavailableError):
    """An engine replica (Ray Serve) died while serving the request, after its first token."""

    type = "replica_unavailable"
