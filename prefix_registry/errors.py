"""The registry's own error tree (the server maps each class to an HTTP status).

```
RegistryError
├── NotFoundError
│   ├── PrefixNotFoundError
│   ├── TenantNotFoundError
│   └── ApiKeyNotFoundError
├── InvalidPrefixError            bad input; the message names the problem
│   ├── FingerprintMismatchError  made for another base model
│   └── UnsafeFileError           pickle / torch checkpoint / unsafe archive member
├── InvalidQuotaError             a quota value out of its range
├── PrefixTooLargeError           over a size limit
├── QuotaExceededError            the tenant's storage quota would be exceeded
├── ConflictError                 already exists
├── CorruptRecordError            a stored record failed its checks when read (the server's data)
└── RegistryUnavailableError      the backend (Redis) is down or timing out
```
"""

from __future__ import annotations

EXCERPT_CHARS = 64


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """Client input for an error message: escaped (repr) and cut to `limit` characters, so a
    10,000-character header or control characters are never echoed back."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class RegistryError(Exception):
    """Base of every error the registry raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(RegistryError):
    """Something looked up by name does not exist."""


class PrefixNotFoundError(NotFoundError):
    pass


class TenantNotFoundError(NotFoundError):
    pass


class ApiKeyNotFoundError(NotFoundError):
    pass


class InvalidPrefixError(RegistryError):
    """The input is not a valid prefix (shape, dtype, values, name, file format...)."""


class FingerprintMismatchError(InvalidPrefixError):
    """The prefix was made for a different base model."""


class UnsafeFileError(InvalidPrefixError):
    """A file that could run code when loaded (pickle, torch checkpoint), or an unsafe archive."""


class InvalidQuotaError(RegistryError):
    """A quota field that does not exist or a value outside its range."""


class QuotaExceededError(RegistryError):
    """Storing this would take the tenant past its prefix count or stored bytes quota."""


class PrefixTooLargeError(RegistryError):
    """The prefix or upload is over a configured size limit."""


class ConflictError(RegistryError):
    """The thing to create already exists."""


class CorruptRecordError(RegistryError):
    """A record read back from the store is inconsistent (not JSON, a truncated blob, a prefix
    length below 1, tensors that disagree with their metadata...). It is the server's data, not
    the caller's input, so it is never an InvalidPrefixError; `key` names the record."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class RegistryUnavailableError(RegistryError):
    """The storage backend can't be reached right now; retrying later may succeed."""
