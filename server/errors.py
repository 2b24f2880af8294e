"""RFC 9457 problem details: the one error shape of the service, its handlers and its OpenAPI declarations."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from codec.errors import AudioError, CheckpointError, CodecError, TokFormatError, UnknownModelError
from codec.stages import StageError

log = logging.getLogger("server")

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_PREFIX = "urn:simvq-codec:problem:"


class Problem(BaseModel):
    """An error response (RFC 9457); `type` is `urn:simvq-codec:problem:<reason>`."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="URI naming the kind of problem.", examples=[_TYPE_PREFIX + "body-too-large"])
    title: str = Field(description="Short summary of the kind of problem.", examples=["Request body too large"])
    status: int = Field(ge=400, le=599, description="The HTTP status code.", examples=[413])
    detail: str = Field(description="What went wrong and what the caller should change.")
    instance: str | None = Field(None, description="The request path.")


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem+json of `status`.

    reason: short slug naming the problem; the `type` URI and the `simvq_rejections_total` label.
    extra: extension members added to the body (e.g. `limit`).
    """

    def __init__(
        self,
        status: int,
        reason: str,
        title: str,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_body(
    conn: HTTPConnection | None, status: int, reason: str, title: str, detail: str, **extra: Any
) -> dict[str, Any]:
    """The problem+json body (for an HTTP request or a WebSocket handshake), counted as a rejection."""
    body: dict[str, Any] = {"type": _TYPE_PREFIX + reason, "title": title, "status": status, "detail": detail}
    if conn is not None:
        body["instance"] = conn.url.path
        metrics = getattr(conn.app.state, "metrics", None)
        if metrics is not None:
            metrics.rejections.labels(reason=reason).inc()
    body.update(extra)
    return body


def problem_response(
    request: HTTPConnection | None,
    status: int,
    reason: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """Build the problem+json response and count it as a rejection."""
    body = problem_body(request, status, reason, title, detail, **extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


_STATUS_TITLES = {
    400: ("bad-request", "Bad request"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    413: ("body-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("invalid-input", "Invalid input"),
    500: ("internal-error", "Internal server error"),
    503: ("unavailable", "Service unavailable"),
    504: ("deadline-exceeded", "Deadline exceeded"),
}


def codec_error_problem(exc: CodecError) -> ProblemError:
    """Map an error the caller caused in `codec/` to a 422 problem with its one-line message."""
    if isinstance(exc, UnknownModelError):
        return ProblemError(422, "unknown-model", "Unknown model", f"{exc}; GET /v1/models lists the models served.")
    if isinstance(exc, TokFormatError):
        return ProblemError(422, "invalid-token-file", "Invalid token file", str(exc))
    if isinstance(exc, AudioError):
        return ProblemError(422, "invalid-audio", "Invalid audio", str(exc))
    if isinstance(exc, StageError):
        return ProblemError(422, "invalid-parameter", "Invalid parameter", str(exc))
    if isinstance(exc, CheckpointError):
        return ProblemError(422, "checkpoint", "Model checkpoint problem", str(exc))
    return ProblemError(422, "invalid-input", "Invalid input", str(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as problem+json; nothing about the server's internals reaches the client."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(request, exc.status, exc.reason, exc.title, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(CodecError)
    async def _codec(request: Request, exc: CodecError) -> JSONResponse:
        p = codec_error_problem(exc)
        return problem_response(request, p.status, p.reason, p.title, p.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            loc = [str(x) for x in err.get("loc", ())]
            where = f"{loc[0]} parameter '{'.'.join(loc[1:])}'" if len(loc) > 1 else ".".join(loc) or "request"
            errors.append({"location": where, "message": str(err.get("msg", "invalid"))})
        detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors) or "the request is invalid"
        return problem_response(request, 422, "invalid-parameter", "Invalid parameter", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason, title = _STATUS_TITLES.get(exc.status_code, ("http-error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404:
            detail = f"no route {request.url.path}; see /docs for the endpoints"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "?")
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        return problem_response(request, exc.status_code, reason, title, detail, dict(exc.headers or {}))

    app.add_middleware(InternalErrors)


class InternalErrors:
    """ASGI middleware: an unexpected exception becomes the 500 problem, logged once, and goes no further.

    Starlette's outermost handler would answer the same 500 but then re-raise, and uvicorn closes a
    connection whose request raised: the client's next request on it failed. An exception after the
    response has started still propagates, since that response can only be cut off.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                raise
            request = Request(scope)
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = problem_response(
                request,
                500,
                "internal-error",
                "Internal server error",
                "the server failed to process this request; it has been logged. Retry, and report it if it persists.",
            )
            await response(scope, receive, send)


def _example(status: int, reason: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": _TYPE_PREFIX + reason, "title": title, "status": status, "detail": detail, **extra}


_PROBLEM_EXAMPLES: dict[int, dict[str, Any]] = {
    400: _example(
        400,
        "invalid-multipart",
        "Malformed multipart body",
        "the multipart body has no file part named 'file'; send the audio as 'file'",
    ),
    404: _example(404, "not-found", "Not found", "no route /v1/nope; see /docs for the endpoints"),
    405: _example(405, "method-not-allowed", "Method not allowed", "GET is not allowed on /encode; allowed: POST"),
    408: _example(
        408,
        "upload-too-slow",
        "Upload too slow",
        "1200 bytes of the body arrived in 5.0 s; after the first 5 s a body must arrive at 16384 "
        "bytes/s or more: send it over a faster link or in a smaller file",
        min_bytes_per_s=16384,
    ),
    413: _example(
        413,
        "body-too-large",
        "Request body too large",
        "the body exceeds 26214400 bytes; send a shorter clip or split it",
        limit=26214400,
    ),
    415: _example(
        415,
        "unsupported-media-type",
        "Unsupported media type",
        "Content-Type text/plain is not accepted; send audio/wav, audio/flac, audio/ogg or multipart/form-data",
    ),
    422: _example(
        422,
        "invalid-parameter",
        "Invalid parameter",
        "query parameter 'stages': Input should be less than or equal to 12",
        errors=[{"location": "query parameter 'stages'", "message": "Input should be less than or equal to 12"}],
    ),
    500: _example(
        500,
        "internal-error",
        "Internal server error",
        "the server failed to process this request; it has been logged. Retry, and report it if it persists.",
    ),
    503: _example(503, "overloaded", "Server busy", "all 4 work slots are busy; retry after the Retry-After delay"),
    504: _example(
        504,
        "deadline-exceeded",
        "Deadline exceeded",
        "the request took longer than 30 s; send shorter audio or retry later",
    ),
}

_DESCRIPTIONS = {
    400: "Malformed multipart body, or the connection closed before the body was complete.",
    404: "No such route.",
    405: "Method not allowed on this route.",
    408: "The body arrived slower than the minimum upload rate (after a grace period).",
    413: "Body, duration or decoded size above the configured limits.",
    415: "Content-Type or audio container/sample format not accepted.",
    422: "A parameter, the audio or the token file is invalid.",
    500: "Unexpected server error (no details are disclosed).",
    503: "Work slots full (with Retry-After), or the model is loading or draining.",
    504: "The per-request deadline passed.",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses, all problem+json with an example."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": _DESCRIPTIONS[status],
            "content": {
                PROBLEM_MEDIA_TYPE: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": _PROBLEM_EXAMPLES[status],
                }
            },
        }
        if status == 503:
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
            }
        out[status] = entry
    return out
