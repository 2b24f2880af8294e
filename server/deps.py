"""Reusable FastAPI dependencies (settings, the runtime, a ready model) and the work slot a request takes
once its body has arrived."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

from fastapi import Depends, Query, Request
from starlette.requests import HTTPConnection

from server.errors import ProblemError
from server.runtime import Runtime, ServedModel, Slot
from server.settings import Settings

T = TypeVar("T")


def get_settings(conn: HTTPConnection) -> Settings:
    return conn.app.state.settings


def get_runtime(conn: HTTPConnection) -> Runtime:
    runtime = getattr(conn.app.state, "runtime", None)
    if runtime is None:  # the app was used without its lifespan
        raise RuntimeError("the app's lifespan has not run; use `with TestClient(app)` or uvicorn")
    return runtime


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

ModelQuery = Annotated[
    str | None,
    Query(
        max_length=255,
        description="Model id (GET /v1/models); default: the server's default model.",
        examples=["simvq-16k"],
    ),
]


def get_model(runtime: RuntimeDep, model: ModelQuery = None) -> ServedModel:
    """The model named by the `model` query parameter (default model if absent); 503 until ready."""
    return runtime.get(model)


@asynccontextmanager
async def work_slot(request: Request, runtime: Runtime) -> AsyncIterator[Slot]:
    """Admit the request's work (immediate 503 with Retry-After when every slot is busy).

    Take it only once the body has been read and checked (`server.uploads`): a slot stands for model
    work, and a client that is slow to send must not hold one. The slot is returned to the pool when
    the block is left and every worker job it started has finished, so a request abandoned at its
    deadline keeps its slot until its computation ends.
    """
    runtime.require_ready()
    metrics = request.app.state.metrics
    slot = runtime.admit(on_release=metrics.work_in_flight.dec)
    metrics.work_in_flight.inc()
    try:
        yield slot
    finally:
        slot.drop()


ModelDep = Annotated[ServedModel, Depends(get_model)]


async def within_deadline(seconds: float, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and answering 504 once `seconds` have passed."""
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11
        raise ProblemError(
            504,
            "deadline-exceeded",
            "Deadline exceeded",
            f"the request took longer than {seconds:g} s; send shorter audio or retry later",
        ) from None
