"""Wire schemas of the native HTTP API (docs/http-api.md); separate from the engine's dataclasses.

Request bodies forbid unknown fields, so a misspelt option is a 422 rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from server.engine.checks import MAX_SEED, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

MAX_PROMPT_CHARS = 1_000_000
MAX_NEW_TOKENS = 1_000_000  # the context refuses far less; this only bounds the integer
MAX_TOP_K = 2**20  # more than any vocabulary; beyond the served one, top_k is off
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # tenant names
PREFIX_REF_PATTERN = r"^[^@\s/]{1,128}(@[0-9]{1,9})?$"  # "name" or "name@version"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WireOut(BaseModel):
    """A response body. Fields with defaults are always sent, so the OpenAPI document marks them
    required (clients may rely on them)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


# --- errors -------------------------------------------------------------------------------------
class ErrorDetail(WireOut):
    type: str = Field(description="machine-readable error type, e.g. not_found, overloaded")
    message: str = Field(description="what went wrong, for a person")


class ErrorBody(WireOut):
    """Every failure, streamed or not."""

    error: ErrorDetail


# --- generation ---------------------------------------------------------------------------------
class GenerateRequest(_Body):
    prefix_id: str | None = Field(
        default=None, pattern=PREFIX_REF_PATTERN, description="'name' or 'name@N'; null = base"
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K, description="0 = off")
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


FinishReasonName = Literal["stop", "length", "cancelled", "error"]


class UsageOut(WireOut):
    prompt_tokens: int
    completion_tokens: int
    prefix_tokens: int


class TimingsOut(WireOut):
    queue_s: float
    ttft_s: float | None
    total_s: float


class PrefixRefOut(WireOut):
    id: str
    version: int


class GenerateDone(WireOut):
    """The final result without its text: the streamed `done` event's data."""

    id: str
    finish_reason: FinishReasonName
    usage: UsageOut
    prefix: PrefixRefOut | None
    timings: TimingsOut


class GenerateResponse(GenerateDone):
    text: str


class DeltaOut(WireOut):
    """A streamed `delta` event's data."""

    text: str


# --- prefixes -----------------------------------------------------------------------------------
class PrefixInfo(WireOut):
    name: str
    version: int
    tenant: str
    form: Literal["p_theta", "kv"]
    prefix_len: int
    dtype: str
    sha256: str
    size_bytes: int
    created_at: float
    description: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict, description="the model fingerprint")
    compatible: bool = Field(
        default=True, description="false: made for another base model; this server can't use it"
    )
    incompatible_reason: str | None = Field(default=None, description="why, when not compatible")


class PrefixDetail(PrefixInfo):
    """The latest version plus every version still stored (newest first)."""

    versions: list[PrefixInfo]


class PrefixPage(WireOut):
    items: list[PrefixInfo]
    next_cursor: str | None


class DeletedOut(WireOut):
    deleted: int


# --- tenants ------------------------------------------------------------------------------------
class TenantCreate(_Body):
    name: str = Field(pattern=NAME_PATTERN)


class IssuedKey(WireOut):
    """A new API key: shown once, stored only as its sha256."""

    name: str
    key_id: str
    api_key: str


class KeyInfo(WireOut):
    key_id: str
    created_at: float


class TenantInfo(WireOut):
    name: str
    keys: list[KeyInfo]


class TenantList(WireOut):
    items: list[TenantInfo]


class RevokedOut(WireOut):
    revoked: str


class TenantDeleted(BaseModel):
    """What deleting a tenant removed: its keys stopped working at once, on every server."""

    name: str
    keys: int = Field(description="API keys revoked")
    prefixes: int = Field(description="prefix versions deleted")


# --- health -------------------------------------------------------------------------------------
class HealthOut(WireOut):
    status: Literal["ok", "engine_dead"]
    detail: str | None = Field(default=None, description="why the process is not alive")


ReadyStatus = Literal["ready", "not_ready", "shutting_down"]


class ReadyOut(WireOut):
    status: ReadyStatus
    checks: dict[str, str] = Field(description="model, engine, registry: 'ok' or what is wrong")
