"""Request bodies under limits: a byte cap and a minimum rate enforced while streaming, multipart, and
audio header checks."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass

import soundfile as sf
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from codec.audio import UNNAMED_INPUT, check_wav_complete
from server.deps import get_runtime
from server.errors import ProblemError
from server.settings import Settings

# Content-Type -> the libsndfile container it must hold.
AUDIO_MEDIA_TYPES: dict[str, str] = {
    "audio/wav": "WAV",
    "audio/x-wav": "WAV",
    "audio/wave": "WAV",
    "audio/vnd.wave": "WAV",
    "audio/flac": "FLAC",
    "audio/x-flac": "FLAC",
    "audio/ogg": "OGG",
    "application/ogg": "OGG",
}
MULTIPART = "multipart/form-data"

# libsndfile container -> accepted sample formats (subtypes).
_PCM_WAV = frozenset({"PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"})
ALLOWED_SUBTYPES: dict[str, frozenset[str]] = {
    "WAV": _PCM_WAV,
    "WAVEX": _PCM_WAV,
    "FLAC": frozenset({"PCM_S8", "PCM_16", "PCM_24"}),
    "OGG": frozenset({"VORBIS", "OPUS"}),
}
_CONTAINER_FAMILY = {"WAV": "WAV", "WAVEX": "WAV", "FLAC": "FLAC", "OGG": "OGG"}
ACCEPTED_TEXT = "audio/wav, audio/flac, audio/ogg or multipart/form-data with a 'file' part"


def media_type(request: Request) -> str:
    """The lower-cased media type of the request without parameters ('' if absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def too_large(limit: int) -> ProblemError:
    return ProblemError(
        413,
        "body-too-large",
        "Request body too large",
        f"the body exceeds {limit} bytes; send a shorter or more compressed clip (e.g. FLAC or Ogg)",
        limit=limit,
    )


def too_slow(settings: Settings, received: int, seconds: float) -> ProblemError:
    return ProblemError(
        408,
        "upload-too-slow",
        "Upload too slow",
        f"{received} bytes of the body arrived in {seconds:.1f} s; after the first {settings.upload_grace_s:g} s "
        f"a body must arrive at {settings.upload_min_bytes_per_s} bytes/s or more: send it over a faster link "
        "or in a smaller file",
        headers={"Connection": "close"},
        min_bytes_per_s=settings.upload_min_bytes_per_s,
    )


def uploads_busy(settings: Settings) -> ProblemError:
    return ProblemError(
        503,
        "uploads-busy",
        "Server busy",
        f"the server is already receiving {settings.max_upload_bytes} bytes of uploads; retry after the "
        "Retry-After delay",
        headers={"Retry-After": str(settings.retry_after_s)},
    )


async def limited_stream(request: Request, settings: Settings) -> AsyncIterator[bytes]:
    """Yield the body chunks under the upload limits: 413 as soon as more than `max_body_bytes` arrived,
    408 as soon as the body falls behind `upload_min_bytes_per_s` after `upload_grace_s`, 503 when the
    bodies being received by all requests would pass `max_upload_bytes`.

    A declared Content-Length above the limit is refused before reading, and a declared length is held
    against `max_upload_bytes` whole; without one (chunked transfer) the bytes are counted and held as
    they arrive. The rate rule: the bytes received by `t` seconds must be at least (t - grace) * rate, so
    the wait for the next chunk ends at grace + received / rate. The hold ends with the stream.
    """
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    if declared is not None and declared > limit:
        raise too_large(limit)
    budget = get_runtime(request).upload_bytes
    held = 0

    def hold(n: int) -> None:
        nonlocal held
        if not budget.try_acquire(n):
            raise uploads_busy(settings)
        held += n

    loop = asyncio.get_running_loop()
    start = loop.time()
    received = 0
    chunks = request.stream().__aiter__()
    try:
        hold(declared or 0)
        while True:
            allowed = start + settings.upload_grace_s + received / settings.upload_min_bytes_per_s - loop.time()
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), max(allowed, 0.0))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11
                raise too_slow(settings, received, loop.time() - start) from None
            except ClientDisconnect:
                raise ProblemError(
                    400,
                    "upload-incomplete",
                    "Upload incomplete",
                    f"the connection closed after {received} bytes of the body; send the whole body",
                ) from None
            received += len(chunk)
            if received > limit:
                raise too_large(limit)
            if received > held:
                hold(received - held)
            if chunk:
                yield chunk
    finally:
        budget.release(held)


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body, under the upload limits of `limited_stream` (413, 408, 503)."""
    stream = limited_stream(request, settings)
    try:
        return b"".join([chunk async for chunk in stream])
    finally:
        await stream.aclose()


async def read_audio_upload(request: Request, settings: Settings) -> tuple[bytes, str | None]:
    """The audio bytes of an upload and the container its Content-Type names (None for multipart).

    415 for a Content-Type outside the allowlist; 400 for a malformed multipart body or no `file` part;
    413 and 408 from the upload limits.
    """
    kind = media_type(request)
    if kind in AUDIO_MEDIA_TYPES:
        data = await read_body(request, settings)
        return data, AUDIO_MEDIA_TYPES[kind]
    if kind != MULTIPART:
        shown = kind or "(none)"
        raise ProblemError(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"Content-Type {shown} is not accepted; send {ACCEPTED_TEXT}",
        )
    stream = limited_stream(request, settings)
    parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=16, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # starlette's messages are sentences ("Invalid multipart data.")
        said = exc.message.strip().rstrip(".")
        raise ProblemError(
            400,
            "invalid-multipart",
            "Malformed multipart body",
            f"{said[:1].lower()}{said[1:]}; send one file part named 'file'",
        ) from None
    finally:
        await stream.aclose()  # ends its hold on max_upload_bytes even when the parser stopped early
    try:
        part = form.get("file")
        if not isinstance(part, UploadFile):
            raise ProblemError(
                400,
                "invalid-multipart",
                "Malformed multipart body",
                "the multipart body has no file part named 'file'; send the audio as 'file'",
            )
        return await part.read(), None
    finally:
        await form.close()


@dataclass(frozen=True)
class AudioProbe:
    """What the audio header declares, checked against the limits before any sample is decoded."""

    container: str
    subtype: str
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def probe_audio(data: bytes, expected: str | None, settings: Settings) -> AudioProbe:
    """Open the header only and enforce the container/sample-format allowlist and the size limits.

    415: container or sample format not allowed, or not what the Content-Type says.
    422: unreadable header, sample rate or channel count out of bounds, empty, or truncated (fewer frames
         than the header declares: the same rule and message as the CLI, `codec.audio.check_wav_complete`).
    413: declared duration or decoded size above the limits.
    """
    if not data:
        raise ProblemError(422, "invalid-audio", "Invalid audio", "the body is empty; send an audio file")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            container, subtype = f.format, f.subtype
            rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
    except sf.LibsndfileError as exc:
        raise ProblemError(
            422,
            "invalid-audio",
            "Invalid audio",
            f"the body is not a readable WAV, FLAC or Ogg file ({exc.error_string})",
        ) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ProblemError(
            422,
            "invalid-audio",
            "Invalid audio",
            f"the body is not a readable WAV, FLAC or Ogg file ({type(exc).__name__})",
        ) from None
    if container not in ALLOWED_SUBTYPES:
        raise ProblemError(
            415,
            "unsupported-container",
            "Unsupported audio container",
            f"{container} audio is not accepted; convert it to WAV, FLAC or Ogg (Vorbis/Opus)",
        )
    if expected is not None and _CONTAINER_FAMILY[container] != expected:
        raise ProblemError(
            415,
            "content-type-mismatch",
            "Content-Type does not match the body",
            f"the Content-Type names {expected} but the body is {_CONTAINER_FAMILY[container]}; "
            f"send Content-Type audio/{_CONTAINER_FAMILY[container].lower()}",
        )
    if subtype not in ALLOWED_SUBTYPES[container]:
        allowed = ", ".join(sorted(ALLOWED_SUBTYPES[container]))
        raise ProblemError(
            415,
            "unsupported-sample-format",
            "Unsupported sample format",
            f"{container} with {subtype} samples is not accepted; use one of {allowed}",
        )
    if not settings.min_sample_rate <= rate <= settings.max_sample_rate:
        raise ProblemError(
            422,
            "invalid-sample-rate",
            "Sample rate out of range",
            f"sample rate {rate} Hz is outside "
            f"{settings.min_sample_rate}..{settings.max_sample_rate} Hz; resample the audio",
            sample_rate=rate,
        )
    if not 1 <= channels <= settings.max_channels:
        raise ProblemError(
            422,
            "invalid-channels",
            "Too many channels",
            f"{channels} channels; at most {settings.max_channels} are accepted: mix down first",
            channels=channels,
        )
    if frames <= 0:
        raise ProblemError(422, "invalid-audio", "Invalid audio", "the audio holds no samples")
    probe = AudioProbe(container, subtype, rate, channels, frames)
    if probe.duration_s > settings.max_duration_s:
        raise ProblemError(
            413,
            "audio-too-long",
            "Audio too long",
            f"the header declares {probe.duration_s:.1f} s; at most {settings.max_duration_s:g} s "
            "per request: split the audio or use the streaming endpoint",
            limit_seconds=settings.max_duration_s,
        )
    if frames * channels > settings.max_input_samples:
        raise ProblemError(
            413,
            "audio-too-large",
            "Audio too large once decoded",
            f"{frames} frames x {channels} channels exceed {settings.max_input_samples} samples; "
            "send fewer channels or a lower sample rate",
        )
    if _CONTAINER_FAMILY[container] == "WAV":
        check_wav_complete(io.BytesIO(data), UNNAMED_INPUT, frames, rate)  # AudioError: 422
    return probe
