"""The ingress deployment: the same FastAPI app as a single process (auth, registry, wire
formats), with the engine replicas behind `RayEngineClient` instead of a local engine."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.app import create_app
from server.models.loader import ModelSummary
from server.serve_ray.client import RayEngineClient
from server.settings import Settings


@serve.ingress()
class Ingress:
    """Built at replica start (`__serve_build_asgi_app__`): it needs the engine's handle and
    the model's description, which the engine replicas give without the ingress loading
    weights."""

    async def __init__(self, engine: DeploymentHandle, settings: Settings) -> None:  # type: ignore[misc]
        summary: ModelSummary = await engine.describe.remote()
        self._app = create_app(settings, loaded=summary, engine=RayEngineClient(engine))
        self._app.add_middleware(_ProxyRequestId)  # outermost

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app


class _ProxyRequestId:
    """Ray Serve's proxy puts an X-Request-ID on every request (the client's, else a new one),
    which the app adopts, and on every response; the app's own copy would repeat the header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_once(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(k, v) for k, v in message.get("headers", [])
                                      if k.lower() != b"x-request-id"]
            await send(message)

        await self.app(scope, receive, send_once)
