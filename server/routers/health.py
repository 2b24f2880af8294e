"""GET /healthz (alive), /readyz (loaded, warmed up, not draining) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import RuntimeDep
from server.errors import ProblemError, problem_responses
from server.runtime import Phase
from server.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, responses=problem_responses(500, 503), summary="Liveness")
async def healthz(runtime: RuntimeDep) -> Health:
    """200 while the process can serve (also while loading or draining); 503 if the model failed to load."""
    if runtime.phase is Phase.FAILED:
        raise ProblemError(
            503,
            "model-failed",
            "Model unavailable",
            f"the model failed to load ({runtime.failure}); fix the model settings and restart",
        )
    return Health(status="alive")


@router.get("/readyz", response_model=Readiness, responses=problem_responses(500, 503), summary="Readiness")
async def readyz(runtime: RuntimeDep) -> Readiness:
    """200 once every model is loaded and warmed up; 503 while loading, after a failure or while draining."""
    runtime.require_ready()
    return Readiness(status=runtime.phase.value, models=list(runtime.models), max_streams=runtime.stream_slots.capacity)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {
                CONTENT_TYPE_LATEST.split(";")[0]: {
                    "schema": {"type": "string"},
                    "example": "simvq_http_requests_in_flight 1.0\n",
                }
            },
        },
        **problem_responses(500),
    },
)
async def metrics(request: Request) -> Response:
    """Requests by route and status, latency histograms, audio seconds, in-flight work, rejections by reason."""
    m = request.app.state.metrics
    runtime = getattr(request.app.state, "runtime", None)
    m.ready.set(1 if runtime is not None and runtime.phase is Phase.READY else 0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
