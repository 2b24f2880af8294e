"""JSON bodies of the service: the token JSON (codes plus .tok header fields), model listing, health."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from codec.stages import MAX_STAGES

_TOKENS_EXAMPLE = {
    "model_id": "simvq-16k",
    "weights_hash": "3f2a9c0d11b7e845",
    "sample_rate": 16000,
    "hop_length": 320,
    "frame_rate": 50.0,
    "n_stages": 2,
    "bits_per_code": 10,
    "stage_bits": [10, 10],
    "num_samples": 1000,
    "num_frames": 4,
    "codes": [[17, 1023, 0, 512], [3, 88, 940, 7]],
}


class TokenJSON(BaseModel):
    """Codes as integers plus the .tok header fields; `POST /encode?format=json` returns it and
    `POST /decode` accepts it. `codes[s][f]` is stage `s` of frame `f`."""

    # strict: a number given as a string ("7") or a boolean (true) is refused, not converted
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [_TOKENS_EXAMPLE]})

    model_id: str = Field(min_length=1, max_length=255, description="Model that made the codes.")
    weights_hash: str = Field(
        pattern=r"^[0-9a-f]{16}$", description="First 8 bytes of the model weights' sha256, as 16 hex digits."
    )
    sample_rate: int = Field(ge=1, le=384_000, description="Sample rate of the decoded audio, Hz.")
    hop_length: int = Field(ge=1, le=1_000_000, description="Samples per frame.")
    frame_rate: float = Field(gt=0, description="Frames per second (sample_rate / hop_length), informative.")
    n_stages: int = Field(ge=1, le=MAX_STAGES, description="Residual stages per frame (rows of `codes`).")
    bits_per_code: int | None = Field(
        None, ge=1, le=16, description="Bits of every code when all stages share one width (null otherwise)."
    )
    stage_bits: list[Annotated[int, Field(ge=1, le=16)]] | None = Field(
        None,
        max_length=MAX_STAGES,
        description="Bits per code of each stage; codes[s] are in [0, 2**stage_bits[s]). "
        "A request gives this, bits_per_code, or both (consistent).",
    )
    num_samples: int = Field(ge=0, description="Samples of the original audio; decode returns exactly this many.")
    num_frames: int = Field(ge=0, description="Frames (columns of `codes`).")
    codes: list[list[Annotated[int, Field(ge=0, lt=1 << 16)]]] = Field(
        max_length=MAX_STAGES, description="[n_stages][num_frames] integer codes, each in [0, 2**bits_per_code)."
    )

    @model_validator(mode="after")
    def _one_width_rule(self) -> "TokenJSON":
        if self.stage_bits is None and self.bits_per_code is None:
            raise ValueError("give stage_bits (one width per stage) or bits_per_code")
        if (
            self.stage_bits is not None
            and self.bits_per_code is not None
            and set(self.stage_bits) != {self.bits_per_code}
        ):
            raise ValueError(f"bits_per_code {self.bits_per_code} contradicts stage_bits {self.stage_bits}")
        return self

    def widths(self) -> list[int] | int:
        """The stage widths as `TokHeader` takes them."""
        return self.stage_bits if self.stage_bits is not None else self.bits_per_code


class ModelInfo(BaseModel):
    """One served model."""

    id: str = Field(examples=["simvq-16k"])
    default: bool = Field(description="Used when a request names no model.")
    trained: bool = Field(description="False for the untrained stand-in shipped before training finishes.")
    sample_rate: int = Field(examples=[16000])
    hop_length: int = Field(examples=[320])
    frame_rate: float = Field(examples=[50.0])
    n_stages: int = Field(description="Residual stages (the maximum `stages`).", examples=[12])
    codebook_sizes: list[int] = Field(description="Codes per stage.", examples=[[1024, 1024]])
    stage_bits: list[int] = Field(
        description="Bits per code of each stage, as packed in .tok files.", examples=[[10, 10]]
    )
    codebook_size: int | None = Field(
        description="Codes per stage when every stage has the same size, else null.", examples=[1024]
    )
    bits_per_code: int | None = Field(
        description="Bits per code when every stage has the same width, else null.", examples=[10]
    )
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
