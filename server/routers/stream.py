"""WebSocket /v1/stream/encode and /v1/stream/decode: 16-bit PCM frames in, token frames out, or back.

Protocol (docs/service.md): the client sends a JSON start message, the server answers `ready` with the
stream's layout, then binary messages flow; each output is sent as soon as its frame is complete. A
JSON `{"type": "end"}` flushes the last partial frame and ends with `{"type": "end", ...}` and close 1000.
Token frames are little-endian uint16, frame-major: `n * stages` values for n frames.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import soxr
from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from codec.stages import MAX_STAGES, StageError, resolve_stages, shared_width
from server.errors import ProblemError, codec_error_problem, problem_body, problem_response
from server.runtime import Phase, Runtime, ServedModel
from server.scheduler import BEHIND_S, CLOSE_INTERNAL, CLOSE_TRY_LATER, Stream, StreamFailed, pump

log = logging.getLogger("server")
router = APIRouter()

# WebSocket close codes (RFC 6455 section 7.4.1)
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_UNSUPPORTED, CLOSE_INVALID = 1000, 1001, 1003, 1007
CLOSE_POLICY, CLOSE_TOO_BIG = 1008, 1009  # and CLOSE_INTERNAL, CLOSE_TRY_LATER from server.scheduler


class StreamError(Exception):
    """Ends a stream: an `error` message with the problem fields, then a close with `code`."""

    def __init__(self, code: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.reason, self.detail = code, reason, detail


class EncodeStart(BaseModel):
    """First message of /v1/stream/encode."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["start"] = "start"
    model: str | None = Field(None, max_length=255)
    stages: int | None = Field(None, ge=1, le=MAX_STAGES)
    bitrate: float | None = Field(None, description="Target kbit/s, by the rule of POST /encode's `bitrate`.")
    sample_rate: int | None = Field(None, ge=1, description="PCM rate; default the model's (resampled if not).")
    channels: int = Field(1, ge=1, description="Interleaved PCM channels, mixed down by averaging.")
    format: Literal["s16le"] = "s16le"


class DecodeStart(BaseModel):
    """First message of /v1/stream/decode."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["start"] = "start"
    model: str | None = Field(None, max_length=255)
    stages: int | None = Field(None, ge=1, le=MAX_STAGES, description="Codes per incoming frame; default all.")
    format: Literal["s16le"] = "s16le"


@dataclass
class _Session:
    websocket: WebSocket
    runtime: Runtime
    idle_timeout: float

    async def receive(self) -> dict[str, Any]:
        try:
            if hasattr(asyncio, "timeout"):  # Python 3.11: a timer, not the task wait_for makes per message
                async with asyncio.timeout(self.idle_timeout):
                    message = await self.websocket.receive()
            else:
                message = await asyncio.wait_for(self.websocket.receive(), self.idle_timeout)
        except asyncio.TimeoutError:
            raise StreamError(
                CLOSE_POLICY, "idle-timeout", f'no message for {self.idle_timeout:g} s; send audio or {{"type": "end"}}'
            ) from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        return message

    async def start(self, schema: type[BaseModel]) -> Any:
        message = await self.receive()
        if message.get("text") is None:
            raise StreamError(
                CLOSE_UNSUPPORTED,
                "expected-start",
                'the first message must be a JSON text start message, e.g. {"type": "start"}',
            )
        try:
            return schema.model_validate_json(message["text"])
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(x) for x in first["loc"]) or "message"
            raise StreamError(CLOSE_POLICY, "invalid-start", f"start message field '{where}': {first['msg']}") from None

    async def send_json(self, payload: dict[str, Any]) -> None:
        await self.websocket.send_text(json.dumps(payload))


def _layout(served: ServedModel, stages: int) -> dict[str, Any]:
    m = served.model
    return {
        "model_id": served.model_id,
        "weights_hash": served.pretrained.weights_hash.hex(),
        "sample_rate": m.sample_rate,
        "hop_length": m.hop_length,
        "frame_rate": m.frame_rate,
        "n_stages": stages,
        "stage_bits": list(m.stage_bits[:stages]),
        "frame_bytes": 2 * stages,
        "bits_per_code": shared_width(m.stage_bits[:stages]),
    }


def _pick_model(runtime: Runtime, model_id: str | None) -> ServedModel:
    try:
        return runtime.get(model_id)
    except ProblemError as exc:
        raise StreamError(CLOSE_POLICY if exc.status == 422 else CLOSE_TRY_LATER, exc.reason, exc.detail) from None


def _stages(model: Any, stages: int | None, bitrate: float | None) -> int:
    try:
        return resolve_stages(model, stages, bitrate)
    except StageError as exc:
        problem = codec_error_problem(exc)  # the reason and detail POST /encode answers
        raise StreamError(CLOSE_POLICY, problem.reason, problem.detail) from None


async def _admit(websocket: WebSocket, runtime: Runtime | None, direction: str) -> bool:
    """Refuse the handshake with 503 problem+json when not ready, behind real time or every stream slot is
    taken."""
    problem = None
    settings = websocket.app.state.settings
    if runtime is None or runtime.phase is not Phase.READY:
        phase = runtime.phase.value if runtime is not None else "starting"
        problem = ("not-ready", f"the server is {phase}; retry shortly")
    elif (lag := runtime.scheduler.lag_s()) > BEHIND_S:
        problem = (
            "streams-behind",
            f"this worker's streams run {lag * 1000:.0f} ms behind real time; retry after the Retry-After delay "
            "or use another instance",
        )
    elif not runtime.stream_slots.try_acquire():
        problem = (
            "streams-full",
            f"all {runtime.stream_slots.capacity} stream slots are busy; retry after the Retry-After delay",
        )
    if problem is None:
        return True
    reason, detail = problem
    headers = {"Retry-After": str(settings.retry_after_s)}
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(
            problem_response(websocket, 503, reason, "Service unavailable", detail, headers=headers)
        )
    else:
        body = problem_body(websocket, 503, reason, "Service unavailable", detail)
        await websocket.accept()
        await websocket.send_text(json.dumps({"type": "error", **body}))
        await websocket.close(CLOSE_TRY_LATER, reason)
    return False


async def _serve(websocket: WebSocket, direction: str, body) -> None:
    """Admission, accounting and error handling shared by both directions; `body(session)` streams."""
    runtime: Runtime | None = getattr(websocket.app.state, "runtime", None)
    if not await _admit(websocket, runtime, direction):
        return
    metrics = websocket.app.state.metrics
    metrics.streams.labels(direction=direction).inc()
    runtime.enter()
    settings = websocket.app.state.settings
    try:
        await websocket.accept()
        session = _Session(websocket, runtime, settings.ws_idle_timeout_s)
        await body(session)
        await websocket.close(CLOSE_NORMAL)
    except WebSocketDisconnect:
        pass
    except StreamError as exc:
        metrics.rejections.labels(reason=exc.reason).inc()
        await _close_with_error(websocket, exc)
    except Exception:
        log.exception("stream %s failed", direction)
        metrics.rejections.labels(reason="internal-error").inc()
        await _close_with_error(
            websocket,
            StreamError(CLOSE_INTERNAL, "internal-error", "the server failed on this stream; it has been logged"),
        )
    finally:
        runtime.stream_slots.release()
        runtime.leave()
        metrics.streams.labels(direction=direction).dec()


async def _close_with_error(websocket: WebSocket, exc: StreamError) -> None:
    if websocket.application_state != WebSocketState.CONNECTED or websocket.client_state != WebSocketState.CONNECTED:
        return
    try:
        await websocket.send_text(
            json.dumps({"type": "error", "reason": exc.reason, "detail": exc.detail, "code": exc.code})
        )
        await websocket.close(exc.code, exc.reason[:120])
    except Exception:  # the client went away meanwhile
        pass


def _check_message(message: dict[str, Any], limit: int) -> bytes | dict[str, Any]:
    """Binary payload, or the parsed JSON control message."""
    data = message.get("bytes")
    if data is not None:
        if len(data) > limit:
            raise StreamError(CLOSE_TOO_BIG, "message-too-large", f"messages are limited to {limit} bytes")
        return data
    try:
        control = json.loads(message.get("text") or "")
    except json.JSONDecodeError:
        raise StreamError(
            CLOSE_UNSUPPORTED, "invalid-control", 'text messages must be JSON, e.g. {"type": "end"}'
        ) from None
    if not isinstance(control, dict) or control.get("type") != "end":
        raise StreamError(CLOSE_UNSUPPORTED, "invalid-control", 'the only control message is {"type": "end"}')
    return control


async def _relay(
    session: _Session, stream: Stream, parse: Callable[[bytes], np.ndarray], finish: Callable[[], np.ndarray]
) -> int:
    """The message loop of both directions. Each binary message is checked and cut into whole frames by
    `parse` (which raises StreamError) and queued on the worker's scheduler while the outputs it delivers are
    sent; `{"type": "end"}` queues `finish()`'s last frames and the end. Returns the bytes sent once the last
    output is out; a stream the scheduler fails (`behind-real-time`) ends with its StreamError."""
    scheduler = session.runtime.scheduler
    limit = session.websocket.app.state.settings.ws_max_message_bytes

    async def read() -> None:
        while True:
            item = _check_message(await session.receive(), limit)
            last = isinstance(item, dict)
            scheduler.submit(stream, finish() if last else parse(item), end=last)
            if last:
                return
            await stream.drained.wait()  # a client far ahead of the scheduler waits here

    def read_failed(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and stream.task is not None:
            stream.task.cancel()  # the pump below stops; the reader's error is raised instead

    reader = asyncio.create_task(read())
    reader.add_done_callback(read_failed)
    try:
        return await pump(stream, session.websocket.send_bytes)
    except asyncio.CancelledError:
        failed = stream.error or (reader.done() and not reader.cancelled() and reader.exception())
        if not failed:
            raise
        asyncio.current_task().uncancel()
        if isinstance(failed, StreamFailed):
            raise StreamError(failed.code, failed.reason, failed.detail) from None
        raise failed from None
    finally:
        reader.cancel()
        scheduler.close(stream)


@router.websocket("/v1/stream/encode")
async def stream_encode(websocket: WebSocket) -> None:
    """16-bit PCM in, token frames out (see the module docstring and docs/service.md)."""

    async def body(session: _Session) -> None:
        runtime, settings = session.runtime, websocket.app.state.settings
        start = await session.start(EncodeStart)
        served = _pick_model(runtime, start.model)
        model = served.model
        stages = _stages(model, start.stages, start.bitrate)
        in_rate = start.sample_rate or model.sample_rate
        if not settings.min_sample_rate <= in_rate <= settings.max_sample_rate:
            raise StreamError(
                CLOSE_POLICY,
                "invalid-sample-rate",
                f"sample_rate {in_rate} is outside {settings.min_sample_rate}..{settings.max_sample_rate}",
            )
        if start.channels > settings.max_channels:
            raise StreamError(CLOSE_POLICY, "invalid-channels", f"at most {settings.max_channels} channels")
        resampler = (
            None
            if in_rate == model.sample_rate
            else soxr.ResampleStream(in_rate, model.sample_rate, 1, dtype="float32")
        )
        block, hop = 2 * start.channels, model.hop_length
        max_in = int(settings.max_stream_duration_s * in_rate)
        seen, frames, out_samples = 0, 0, 0
        pending = np.zeros(0, np.float32)  # the start of a frame not complete yet, at the model rate
        await session.send_json(
            {"type": "ready", **_layout(served, stages), "input_sample_rate": in_rate, "channels": start.channels}
        )

        def cut(mono: np.ndarray, last: bool = False) -> np.ndarray:
            """Audio at the input rate -> the whole frames it completes `[n, hop]` (at the end, the last
            partial frame zero-padded, as `flush_encoder` pads it)."""
            nonlocal pending, frames, out_samples
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=last)
            out_samples += mono.shape[0]
            x = np.concatenate([pending, mono]) if pending.size else mono
            if last and x.shape[0] % hop:
                x = np.concatenate([x, np.zeros(-x.shape[0] % hop, np.float32)])
            whole = x.shape[0] - x.shape[0] % hop
            pending = x[whole:]
            frames += whole // hop
            return np.ascontiguousarray(x[:whole], dtype=np.float32).reshape(-1, hop)

        def parse(data: bytes) -> np.ndarray:
            """A PCM message -> the whole frames it completes."""
            nonlocal seen
            if len(data) % block:
                raise StreamError(
                    CLOSE_INVALID,
                    "invalid-pcm",
                    f"PCM messages must hold whole frames of {block} bytes "
                    f"({start.channels} channel(s) x 16 bits); got {len(data)} bytes",
                )
            pcm = np.frombuffer(data, "<i2").reshape(-1, start.channels)
            seen += pcm.shape[0]
            if seen > max_in:
                raise StreamError(
                    CLOSE_POLICY, "stream-too-long", f"a stream may carry at most {settings.max_stream_duration_s:g} s"
                )
            return cut(
                pcm.astype(np.float32).mean(axis=1) / 32768.0
                if start.channels > 1
                else pcm[:, 0].astype(np.float32) / 32768.0
            )

        stream = runtime.scheduler.open(model, "encode", stages)
        await _relay(session, stream, parse, lambda: cut(np.zeros(0, np.float32), last=True))
        websocket.app.state.metrics.audio_seconds.labels(operation="stream_encode").inc(out_samples / model.sample_rate)
        await session.send_json({"type": "end", "num_samples": out_samples, "num_frames": frames})

    await _serve(websocket, "encode", body)


@router.websocket("/v1/stream/decode")
async def stream_decode(websocket: WebSocket) -> None:
    """Token frames in, 16-bit PCM out at the model's rate (see docs/service.md)."""

    async def body(session: _Session) -> None:
        runtime, settings = session.runtime, websocket.app.state.settings
        start = await session.start(DecodeStart)
        served = _pick_model(runtime, start.model)
        model = served.model
        stages = _stages(model, start.stages, None)
        max_frames = int(settings.max_stream_duration_s * model.frame_rate)
        frames = 0
        await session.send_json({"type": "ready", **_layout(served, stages)})

        def parse(data: bytes) -> np.ndarray:
            """A token message -> its frames, codes `[n, stages]` int64."""
            nonlocal frames
            if len(data) % (2 * stages):
                raise StreamError(
                    CLOSE_INVALID,
                    "invalid-tokens",
                    f"token messages must hold whole frames of {2 * stages} bytes "
                    f"({stages} uint16 codes); got {len(data)} bytes",
                )
            codes = np.frombuffer(data, "<u2").astype(np.int64)
            sizes = np.asarray(model.codebook_sizes[:stages])
            beyond = (codes.reshape(-1, stages) >= sizes).any(0)
            if beyond.any():
                s = int(beyond.argmax())
                raise StreamError(
                    CLOSE_INVALID,
                    "invalid-tokens",
                    f"stage {s + 1}'s codes must lie in "
                    f"[0, {sizes[s]}); got {int(codes.reshape(-1, stages)[:, s].max())}",
                )
            frames += codes.size // stages
            if frames > max_frames:
                raise StreamError(
                    CLOSE_POLICY, "stream-too-long", f"a stream may carry at most {settings.max_stream_duration_s:g} s"
                )
            return codes.reshape(-1, stages)

        stream = runtime.scheduler.open(model, "decode", stages)
        sent = await _relay(session, stream, parse, lambda: np.zeros((0, stages), np.int64))
        out_samples = sent // 2
        websocket.app.state.metrics.audio_seconds.labels(operation="stream_decode").inc(out_samples / model.sample_rate)
        await session.send_json({"type": "end", "num_samples": out_samples, "num_frames": frames})

    await _serve(websocket, "decode", body)
