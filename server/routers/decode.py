"""POST /decode: a .tok file or token JSON in, WAV or FLAC out with exactly the original sample count."""

from __future__ import annotations

import io
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from codec.api import decode_codes
from codec.audio import write_audio
from codec.tokfile import TokHeader
from server.deps import ModelQuery, RuntimeDep, SettingsDep, within_deadline, work_slot
from server.errors import ProblemError, problem_responses
from server.runtime import ServedModel
from server.tokens import parse_tok, parse_token_json
from server.uploads import media_type, read_body

router = APIRouter(tags=["codec"])

_MEDIA = {"wav": ("audio/wav", "WAV"), "flac": ("audio/flac", "FLAC")}

_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A `.tok` file (as `POST /encode` returns it) or the token JSON of `format=json`.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/TokenJSON"}},
        },
    }
}

_OK = {
    200: {
        "description": "16-bit mono audio at the model's rate with exactly `num_samples` samples.",
        "content": {
            "audio/wav": {"schema": {"type": "string", "format": "binary"}},
            "audio/flac": {"schema": {"type": "string", "format": "binary"}},
        },
        "headers": {
            "X-Audio-Seconds": {"description": "Duration of the decoded audio.", "schema": {"type": "number"}},
            "X-Clipped-Samples": {"description": "Samples clipped to [-1, 1].", "schema": {"type": "integer"}},
        },
    }
}


def _decode_job(header: TokHeader, codes: np.ndarray, served: ServedModel, container: str) -> tuple[bytes, int]:
    """Decode to float audio through `served.decode` (the batcher, if any), trim/check the length, write 16-bit
    WAV/FLAC bytes (a worker job). The header has been matched to the model already (`model_for_header`)."""
    wav = decode_codes(codes, served.model, header.num_samples, decode=served.decode)
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.shape[0] != header.num_samples:
        raise RuntimeError(f"decoder returned {wav.shape[0]} samples for a header of {header.num_samples}")
    buf = io.BytesIO()
    clipped = write_audio(buf, wav, header.sample_rate, container)  # the CLI's writer and its rules
    return buf.getvalue(), clipped


@router.post(
    "/decode",
    summary="Decode tokens to audio",
    response_class=Response,
    responses={**_OK, **problem_responses(400, 408, 413, 415, 422, 500, 503, 504)},
    openapi_extra=_REQUEST_BODY,
)
async def decode(
    request: Request,
    settings: SettingsDep,
    runtime: RuntimeDep,
    model: ModelQuery = None,
    format: Annotated[Literal["wav", "flac"], Query(description="Audio container of the response.")] = "wav",
) -> Response:
    """Decode a `.tok` file (`application/octet-stream`) or token JSON (`application/json`) made by
    `POST /encode`. The model is the one the tokens name unless `model` is given."""
    kind = media_type(request)
    if kind not in ("application/octet-stream", "application/json"):
        shown = kind or "(none)"
        raise ProblemError(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"Content-Type {shown} is not accepted; send a .tok file as application/octet-stream "
            "or token JSON as application/json",
        )
    media, container = _MEDIA[format]
    runtime.require_ready()
    body = await read_body(request, settings)  # under the upload limits, before a slot
    parse = parse_tok if kind == "application/octet-stream" else parse_token_json

    async with work_slot(request, runtime) as slot:

        async def work() -> tuple[TokHeader, bytes, int]:
            served, header, codes = await runtime.run(slot, parse, body, settings, runtime, model)
            return header, *await runtime.run(slot, _decode_job, header, codes, served, container)

        header, audio, clipped = await within_deadline(settings.request_timeout_s, work())
    seconds = header.num_samples / header.sample_rate
    request.app.state.metrics.audio_seconds.labels(operation="decode").inc(seconds)
    headers = {"X-Audio-Seconds": f"{seconds:.6f}", "X-Clipped-Samples": str(clipped)}
    return Response(audio, media_type=media, headers=headers)
