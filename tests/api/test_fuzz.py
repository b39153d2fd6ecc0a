"""Bad input never gets a 5xx: schemathesis generates requests from the server's own OpenAPI
document (valid, invalid and edge-case bodies, headers and paths) and sends them to a real
uvicorn; afterwards the engine must still be serving."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from server.models.loader import LoadedModel
from tests.api.conftest import SettingsFactory
from tests.api.helpers import ADMIN_KEY, auth
from tests.api.live import LiveServer, live_server

SCHEMATHESIS = shutil.which("schemathesis") or shutil.which("st")


@pytest.fixture
def live(make_settings: SettingsFactory, loaded: LoadedModel) -> Iterator[LiveServer]:
    # Short generations keep the fuzzed /generate calls cheap: max_seq_len bounds a request's
    # prefix + prompt + output at 64 tokens (a fuzzed max_new_tokens of 10**6 is refused with a
    # 400, as it would be anywhere), so no call generates the model's whole context. The queue
    # never refuses them.
    settings = make_settings(max_queue=64, max_batch_size=4, max_seq_len=64)
    with live_server(settings, loaded) as server:
        yield server


# One request at a time (concurrent workers only queue behind each other on a 2-core machine),
# each allowed a minute: schemathesis's default of 10 s failed on a busy machine. A hung request
# still fails the run, and so does the whole run past its 240 s.
REQUEST_TIMEOUT_S = 60

# (caller, extra arguments): every operation briefly as either caller, then /generate in depth
# (its sampling fields reach the engine: a vanishing temperature once killed it).
RUNS = {
    "all-operator": ("operator", ["--max-examples", "8"]),
    "all-tenant": ("tenant", ["--max-examples", "8"]),
    "generate-deep": ("operator", ["--max-examples", "150", "--include-path", "/generate"]),
}


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is not installed")
@pytest.mark.parametrize("run_name", list(RUNS))
def test_no_request_gets_a_server_error(live: LiveServer, run_name: str) -> None:
    caller, extra = RUNS[run_name]
    key = ADMIN_KEY
    if caller == "tenant":
        created = httpx.post(f"{live.url}/admin/tenants", headers=auth(ADMIN_KEY),
                             json={"name": "fuzz"})
        key = str(created.json()["api_key"])
    command = [
        str(SCHEMATHESIS), "run", f"{live.url}/openapi.json",
        "-H", f"Authorization: Bearer {key}",
        "--checks", "not_a_server_error", "--seed", "1", "--phases", "coverage,fuzzing",
        "--no-color", "--workers", "1", "--request-timeout", str(REQUEST_TIMEOUT_S), *extra,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    ready = httpx.get(f"{live.url}/ready")
    assert ready.status_code == 200, ready.text
