"""Token payloads of the HTTP API: .tok bytes and token JSON to (TokHeader, codes) and back, under limits."""

from __future__ import annotations

import io
import math

import numpy as np
from pydantic import ValidationError

from codec.errors import TokFormatError
from codec.tokfile import TokHeader, TokReader, check_codes, write_tok
from server.errors import ProblemError
from server.runtime import Runtime, ServedModel
from server.schemas import TokenJSON
from server.settings import Settings


def too_long(seconds: float, settings: Settings) -> ProblemError:
    return ProblemError(
        413,
        "audio-too-long",
        "Audio too long",
        f"the tokens describe {seconds:.1f} s of audio; at most {settings.max_duration_s:g} s per request: "
        "split the file or use the streaming endpoint",
        limit_seconds=settings.max_duration_s,
    )


def max_frames(header: TokHeader, settings: Settings) -> int:
    """The most frames of a request; `header` has been completed by its model (it has the sample rate)."""
    return math.ceil(settings.max_duration_s * header.sample_rate / header.hop_length)


def parse_tok(
    data: bytes, settings: Settings, runtime: Runtime, requested: str | None
) -> tuple[ServedModel, TokHeader, np.ndarray]:
    """Read .tok bytes for the model that made them (`model_for_header`); the duration limit is checked from
    the header before any code is unpacked.

    A streamed file (counts in the trailer) is read block by block and refused as soon as it passes
    the limit. TokFormatError (422) for anything malformed.
    """
    reader = TokReader(io.BytesIO(data), block_frames=4096)
    served, header = model_for_header(reader.header, runtime, requested)
    limit = max_frames(header, settings)
    if header.num_frames is not None and header.num_frames > limit:
        raise too_long(header.num_samples / header.sample_rate, settings)
    blocks, frames = [], 0
    for block in reader:
        frames += block.shape[1]
        if frames > limit:
            raise too_long(frames * header.hop_length / header.sample_rate, settings)
        blocks.append(block)
    header = served.pretrained.check(reader.header)  # a streamed file learns its counts from the trailer
    codes = np.concatenate(blocks, axis=1) if blocks else np.zeros((header.n_stages, 0), np.int64)
    return served, header, codes


def parse_token_json(
    data: bytes, settings: Settings, runtime: Runtime, requested: str | None
) -> tuple[ServedModel, TokHeader, np.ndarray]:
    """Validate token JSON (422 naming the field), check the duration (413), build the codes array, then find
    the model that made them (`model_for_header`)."""
    try:
        doc = TokenJSON.model_validate_json(data)
    except ValidationError as exc:
        errors = [
            {"location": "body field '" + ".".join(str(x) for x in e["loc"]) + "'", "message": e["msg"]}
            for e in exc.errors(include_url=False)[:20]
        ]
        detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors) or "invalid token JSON"
        raise ProblemError(422, "invalid-token-json", "Invalid token JSON", detail, errors=errors) from None
    header = TokHeader(
        doc.model_id,
        bytes.fromhex(doc.weights_hash),
        doc.sample_rate,
        doc.hop_length,
        doc.n_stages,
        doc.widths(),
        doc.num_samples,
        doc.num_frames,
    )
    if doc.num_samples / doc.sample_rate > settings.max_duration_s:
        raise too_long(doc.num_samples / doc.sample_rate, settings)
    if len(doc.codes) != doc.n_stages:
        raise TokFormatError(f"codes has {len(doc.codes)} rows but n_stages is {doc.n_stages}")
    for s, row in enumerate(doc.codes):
        if len(row) != doc.num_frames:
            raise TokFormatError(f"codes[{s}] has {len(row)} frames but num_frames is {doc.num_frames}")
    codes = np.array(doc.codes, dtype=np.int64).reshape(doc.n_stages, doc.num_frames)
    check_codes(header, codes)
    served, header = model_for_header(header, runtime, requested)
    return served, header, codes


def tok_bytes(header: TokHeader, codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    write_tok(buf, header, codes)
    return buf.getvalue()


def token_json(header: TokHeader, codes: np.ndarray) -> dict:
    return TokenJSON(
        model_id=header.model_id,
        weights_hash=header.weights_hash.hex(),
        sample_rate=header.sample_rate,
        hop_length=header.hop_length,
        frame_rate=header.frame_rate,
        n_stages=header.n_stages,
        bits_per_code=header.bits_per_code,
        stage_bits=list(header.stage_bits),
        num_samples=header.num_samples,
        num_frames=header.num_frames,
        codes=np.asarray(codes).tolist(),
    ).model_dump()


def model_for_header(header: TokHeader, runtime: Runtime, requested: str | None) -> tuple[ServedModel, TokHeader]:
    """The served model that can decode `header` (the requested one, else the one whose weights made the codes)
    and the header it completes (`Pretrained.check`).

    422 `unknown-model` when no served model has the weights, `model-mismatch` with the codec's one message
    when the model does not fit the tokens (weights, rate, hop, stages or their bits).
    """
    if requested is not None:
        served = runtime.get(requested)
    else:
        runtime.require_ready()
        matches = [m for m in runtime.models.values() if header.made_with(m.pretrained.sha256)]
        if not matches:
            named = "" if header.model_id is None else f" (model '{header.model_id}' in the tokens)"
            served_ids = ", ".join(f"{m.model_id} (weights {m.pretrained.sha256[:8]})" for m in runtime.models.values())
            raise ProblemError(
                422,
                "unknown-model",
                "Unknown model",
                f"the tokens were made with weights {header.weights_hash.hex()}{named}, which this "
                f"server does not serve (it serves: {served_ids})",
            )
        served = next((m for m in matches if m.model_id == header.model_id), matches[0])
    try:
        return served, served.pretrained.check(header)
    except TokFormatError as exc:
        raise ProblemError(422, "model-mismatch", "Tokens do not fit the model", str(exc)) from None
