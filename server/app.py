"""The FastAPI app: `create_app(settings)`, its lifespan (load once, warm up, ready; drain on shutdown)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.errors import Problem, install_error_handlers
from server.metrics import Metrics, MetricsMiddleware
from server.routers import decode, encode, health, listen, stream
from server.routers import models as models_router
from server.runtime import ClipBatcher, Phase, Runtime
from server.schemas import TokenJSON
from server.settings import Settings

log = logging.getLogger("server")

DESCRIPTION = """\
Neural speech codec service. `POST /encode` turns audio into tokens (`.tok` bytes or JSON),
`POST /decode` turns them back into audio with the original number of samples. WebSocket
`/v1/stream/encode` and `/v1/stream/decode` stream 16-bit PCM and token frames (docs/service.md).
`GET /` is a listening page: record or upload a clip and hear it at several bitrates.
Every error is `application/problem+json` (RFC 9457).
"""


def create_app(
    settings: Settings | None = None, models: dict[str, Any] | None = None, batcher: ClipBatcher | None = None
) -> FastAPI:
    """Build the app.

    settings: limits and knobs (default: from `SIMVQ_*` environment variables).
    models: already-loaded models (`codec.Pretrained`, what `load_model` returns) by id, used instead of
        loading `settings.models` (tests, embedding).
    batcher: where the offline encode/decode of one clip go (`ServedModel.batcher`; the Ray Serve deployment's
        `Batcher`); None: each request calls the model itself.
    """
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, metrics, models, batcher)
        app.state.runtime = runtime
        loop = asyncio.get_running_loop()
        loading = loop.run_in_executor(runtime.pool, runtime.load)
        if not settings.load_in_background:
            await loading
        try:
            yield
        finally:
            drained = await runtime.drain(settings.drain_timeout_s)
            if not drained:
                log.warning(
                    "shutdown: %d requests still in flight after %.0f s", runtime.active, settings.drain_timeout_s
                )
            if not loading.done():
                await asyncio.shield(loading)
            runtime.close()
            app.state.runtime = None

    app = FastAPI(
        title="SimVQ Codec service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    for module in (health, models_router, encode, decode, stream, listen):
        app.include_router(module.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            components["TokenJSON"] = TokenJSON.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory server.app:app_from_env` (each worker process reads SIMVQ_*)."""
    configure_logging()
    return create_app(Settings())


__all__ = ["Phase", "app_from_env", "create_app"]
