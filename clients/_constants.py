"""Named defaults of the SDK: where the server is, how long to wait, how often to retry."""

from __future__ import annotations

import httpx

SDK_VERSION = "0.1.0"

BASE_URL_ENV = "PREFIX_SERVE_BASE_URL"
API_KEY_ENV = "PREFIX_SERVE_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"

# Connecting should be quick; reading may wait for a long generation (or the gap between two
# streamed deltas) on a busy CPU server.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 600.0
DEFAULT_TIMEOUT = httpx.Timeout(DEFAULT_READ_TIMEOUT, connect=DEFAULT_CONNECT_TIMEOUT)

# Retries on connection errors, 429 and 503: delay = INITIAL * 2**attempt, capped, minus up to
# JITTER of itself; a server's Retry-After (capped by MAX_RETRY_AFTER) replaces the computed delay.
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
RETRY_JITTER = 0.25
MAX_RETRY_AFTER = 60.0
RETRY_STATUSES = frozenset({429, 503})

DEFAULT_PAGE_SIZE = 50
