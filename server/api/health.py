"""`/health` (liveness: the process can still serve), `/ready` (readiness: model, engine, registry),
`/metrics` (the operator key only: its series name every tenant, with their request and token
counts; `--metrics-port` serves the same on a loopback listener without a key, for Prometheus).

A dead engine never comes back without a restart, so `/health` fails with it: a liveness probe
(Docker's HEALTHCHECK, Kubernetes' livenessProbe) then restarts the process. A registry outage is
not a liveness failure (the server recovers by itself), only a readiness one."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from server.api.deps import OperatorDep, ServicesDep
from server.api.errors import error_responses, to_serve_error
from server.api.metrics import CONTENT_TYPE
from server.api.schemas import HealthOut, ReadyOut, ReadyStatus
from server.api.state import Services

router = APIRouter(tags=["health"])
REGISTRY_PING_TIMEOUT_S = 2.0
_OK = "ok"


@router.get(
    "/health",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "the engine died: restart the process"}},
    summary="Liveness: the process answers and its engine is alive",
)
async def health(services: ServicesDep) -> JSONResponse:
    if services.backend.alive:
        return JSONResponse(HealthOut(status="ok").model_dump(exclude_none=True))
    body = HealthOut(status="engine_dead", detail=_engine_check(services))
    return JSONResponse(body.model_dump(), status_code=503)


@router.get(
    "/ready",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "not ready: the failing checks named"}},
    summary="Ready to serve: model loaded, engine alive, registry reachable",
)
async def ready(services: ServicesDep) -> JSONResponse:
    checks = {"model": _OK, "engine": _engine_check(services),
              "registry": await _registry_check(services)}
    status: ReadyStatus = "ready" if all(v == _OK for v in checks.values()) else "not_ready"
    if services.lifecycle.draining:
        status = "shutting_down"
    body = ReadyOut(status=status, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if status == "ready" else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"},
               **error_responses(401, 403)},
    summary="Prometheus metrics (operator key)",
)
async def metrics(services: ServicesDep, _operator: OperatorDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


def _engine_check(services: Services) -> str:
    if services.backend.alive:
        return _OK
    return f"dead: {services.backend.fatal_error}"


async def _registry_check(services: Services) -> str:
    try:
        await asyncio.wait_for(services.store.ping(), REGISTRY_PING_TIMEOUT_S)
    except TimeoutError:
        return f"unavailable: no answer within {REGISTRY_PING_TIMEOUT_S}s"
    except Exception as exc:
        error = to_serve_error(exc)
        return f"unavailable: {error.message if error else exc}"
    return _OK
