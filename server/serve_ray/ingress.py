"""The ingress deployment: the same FastAPI app as a single process (auth, registry, wire
formats), with the engine replicas behind `RayEngineClient` instead of a local engine."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

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

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
