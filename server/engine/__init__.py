"""The continuous-batching engine: requests with different prefixes share one batch, streamed."""

from server.engine.config import EngineConfig, EngineStats
from server.engine.engine import Engine
from server.engine.request import (
    Completion,
    EngineRequest,
    Event,
    Finished,
    FinishReason,
    PrefixSource,
    SamplingParams,
    TenantShare,
    TextDelta,
    Timings,
    Usage,
)
from server.engine.stream import RequestStream

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "EngineStats",
    "Event",
    "FinishReason",
    "Finished",
    "PrefixSource",
    "RequestStream",
    "SamplingParams",
    "TenantShare",
    "TextDelta",
    "Timings",
    "Usage",
]
