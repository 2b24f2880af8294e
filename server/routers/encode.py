"""POST /encode: audio in (WAV, FLAC, Ogg or multipart), .tok bytes or token JSON out."""

from __future__ import annotations

import io
from typing import Annotated, Any, Literal

import numpy as np
import soundfile as sf
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from codec.api import encode_audio
from codec.errors import AudioError
from codec.stages import MAX_STAGES, resolve_stages
from server.deps import ModelDep, RuntimeDep, SettingsDep, within_deadline, work_slot
from server.errors import problem_responses
from server.runtime import ServedModel
from server.schemas import TokenJSON
from server.tokens import tok_bytes, token_json
from server.uploads import probe_audio, read_audio_upload

router = APIRouter(tags=["codec"])

TOK_MEDIA_TYPE = "application/octet-stream"
_AUDIO_SCHEMA = {"type": "string", "format": "binary"}

_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The audio: any sample rate and channel count (mixed down and resampled to the model's).",
        "content": {
            **{t: {"schema": _AUDIO_SCHEMA} for t in ("audio/wav", "audio/flac", "audio/ogg")},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "The audio file."}},
                }
            },
        },
    }
}

_OK = {
    200: {
        "description": "The tokens: `.tok` bytes (default) or token JSON (`format=json`).",
        "content": {
            TOK_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {"$ref": "#/components/schemas/TokenJSON"},
                "example": TokenJSON.model_config["json_schema_extra"]["examples"][0],
            },
        },
        "headers": {
            "X-Audio-Seconds": {"description": "Duration of the encoded audio.", "schema": {"type": "number"}},
            "X-Stages": {"description": "Residual stages in the tokens.", "schema": {"type": "integer"}},
        },
    }
}


def _encode_job(data: bytes, served: ServedModel, n_stages: int) -> tuple[Any, np.ndarray]:
    """Decode and convert to mono at the model rate (codec.audio's rules, applied once: truncation,
    non-finite samples), then encode through `served.encode`, batched when the deployment batches (a worker job)."""
    try:
        header, codes = encode_audio(io.BytesIO(data), served.pretrained, n_stages=n_stages, encode=served.encode)
    except sf.LibsndfileError as exc:
        raise AudioError(f"the audio could not be decoded ({exc.error_string})") from None
    return header, np.asarray(codes)


@router.post(
    "/encode",
    summary="Encode audio to tokens",
    response_class=Response,
    responses={**_OK, **problem_responses(400, 408, 413, 415, 422, 500, 503, 504)},
    openapi_extra=_REQUEST_BODY,
)
async def encode(
    request: Request,
    settings: SettingsDep,
    runtime: RuntimeDep,
    served: ModelDep,
    stages: Annotated[
        int | None, Query(ge=1, le=MAX_STAGES, description="Residual stages to keep (1..n_stages).")
    ] = None,
    bitrate: Annotated[
        float | None,
        Query(
            description="Target kbit/s: the most stages within it; at or above the top rate, every stage; "
            "above 0 (422 otherwise, as the CLI's --bitrate)."
        ),
    ] = None,
    format: Annotated[Literal["tok", "json"], Query(description="Response: .tok bytes or token JSON.")] = "tok",
) -> Response:
    """Encode one clip. The body is the audio (`audio/wav`, `audio/flac`, `audio/ogg`) or multipart
    with a `file` part; any sample rate and channel count are converted as the CLI does."""
    n_stages = resolve_stages(served.model, stages, bitrate)  # StageError: 422 invalid-parameter (server.errors)
    data, expected = await read_audio_upload(request, settings)  # under the upload limits, before a slot
    probe_audio(data, expected, settings)  # the header only, on the event loop: limits before a work slot

    async with work_slot(request, runtime) as slot:

        async def work() -> tuple[Any, Any]:
            header, codes = await runtime.run(slot, _encode_job, data, served, n_stages)
            return header, await runtime.run(slot, tok_bytes if format == "tok" else token_json, header, codes)

        header, payload = await within_deadline(settings.request_timeout_s, work())
    seconds = header.num_samples / header.sample_rate
    request.app.state.metrics.audio_seconds.labels(operation="encode").inc(seconds)
    headers = {"X-Audio-Seconds": f"{seconds:.6f}", "X-Stages": str(header.n_stages)}
    if format == "json":
        return JSONResponse(payload, headers=headers)
    return Response(payload, media_type=TOK_MEDIA_TYPE, headers=headers)
