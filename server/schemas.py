"""JSON bodies of the service: the token JSON (codes plus .tok header fields), model listing, health."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_TOKENS_EXAMPLE = {
    "model_id": "simvq-16k",
    "weights_hash": "3f2a9c0d11b7e845",
    "sample_rate": 16000,
    "hop_length": 320,
    "frame_rate": 50.0,
    "n_stages": 2,
    "bits_per_code": 10,
    "num_samples": 1000,
    "num_frames": 4,
    "codes": [[17, 1023, 0, 512], [3, 88, 940, 7]],
}


class TokenJSON(BaseModel):
    """Codes as integers plus the .tok header fields; `POST /encode?format=json` returns it and
    `POST /decode` accepts it. `codes[s][f]` is stage `s` of frame `f`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_TOKENS_EXAMPLE]})

    model_id: str = Field(min_length=1, max_length=255, description="Model that made the codes.")
    weights_hash: str = Field(
        pattern=r"^[0-9a-f]{16}$", description="First 8 bytes of the model weights' sha256, as 16 hex digits."
    )
    sample_rate: int = Field(ge=1, le=384_000, description="Sample rate of the decoded audio, Hz.")
    hop_length: int = Field(ge=1, le=1_000_000, description="Samples per frame.")
    frame_rate: float = Field(gt=0, description="Frames per second (sample_rate / hop_length), informative.")
    n_stages: int = Field(ge=1, le=64, description="Residual stages per frame (rows of `codes`).")
    bits_per_code: int = Field(ge=1, le=16, description="Bits per code; codes are in [0, 2**bits_per_code).")
    num_samples: int = Field(ge=0, description="Samples of the original audio; decode returns exactly this many.")
    num_frames: int = Field(ge=0, description="Frames (columns of `codes`).")
    codes: list[list[int]] = Field(max_length=64, description="[n_stages][num_frames] integer codes.")


class ModelInfo(BaseModel):
    """One served model."""

    id: str = Field(examples=["simvq-16k"])
    default: bool = Field(description="Used when a request names no model.")
    trained: bool = Field(description="False for the untrained stand-in shipped before training finishes.")
    sample_rate: int = Field(examples=[16000])
    hop_length: int = Field(examples=[320])
    frame_rate: float = Field(examples=[50.0])
    n_stages: int = Field(description="Residual stages (the maximum `stages`).", examples=[12])
    codebook_size: int = Field(examples=[1024])
    bits_per_code: int = Field(examples=[10])
    bitrates_kbps: list[float] = Field(description="Bitrate for 1..n_stages stages, kbit/s.", examples=[[0.5, 1.0]])
    weights_hash: str = Field(description="First 8 bytes of the weights' sha256 (hex), as in .tok headers.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str = Field(examples=["alive"])


class Readiness(BaseModel):
    status: str = Field(description="loading, ready, failed or draining.", examples=["ready"])
    models: list[str] = Field(default_factory=list, examples=[["simvq-16k"]])
    max_streams: int = Field(
        description="WebSocket streams this worker admits at once: SIMVQ_MAX_STREAMS, or measured during the warm-up.",
        examples=[60],
    )
