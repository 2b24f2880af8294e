"""Service settings from environment variables prefixed `SIMVQ_` (pydantic-settings)."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# uvicorn's WebSocket implementation on the `websockets` library. Its messages take less of the core than
# those of the one on `wsproto`: with 30 two-way streams on one core, the event loop's share fell from 20 %
# to 17 % and the p99 frame delay from about 22 ms to 18 (docs/service.md, "Capacity"). Since uvicorn 0.55 it
# logs nothing for a denial response (a 503 for a full server), as wsproto's did.
UVICORN_WS = "websockets-sansio"


def _default_model() -> str:
    try:
        from codec.presets import DEFAULT_MODEL_ID
    except ImportError:  # the codec package is always installed with the server; keep settings importable
        return "simvq-16k"
    return DEFAULT_MODEL_ID


class Settings(BaseSettings):
    """Every limit and knob of the service; each field is also `SIMVQ_<NAME>` in the environment.

    List fields accept JSON (`["a","b"]`) or a comma-separated string (`a,b`).
    """

    model_config = SettingsConfigDict(env_prefix="SIMVQ_", extra="ignore", validate_default=True)

    # --- models and compute -------------------------------------------------------------------------------
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [_default_model()],
        description="Model ids (presets) or checkpoint directories to load; the first is the default.",
    )
    device: str = Field("cpu", description="Torch device for every model, e.g. 'cpu' or 'cuda:0'.")
    torch_threads: int = Field(1, ge=1, le=256, description="Intra-op torch threads (torch.set_num_threads).")
    pool_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Threads running model work; default: CPU count // torch_threads on CPU, 1 on a GPU.",
    )
    warmup: bool = Field(True, description="Encode and decode a short clip before readiness turns green.")
    load_in_background: bool = Field(
        True, description="Load models in a background task so /healthz answers while loading (tests turn it off)."
    )

    # --- admission and deadlines --------------------------------------------------------------------------
    max_concurrency: int = Field(
        4, ge=1, le=10_000, description="Encode/decode requests admitted at once; beyond it an immediate 503."
    )
    max_streams: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Concurrent WebSocket streams per worker; beyond it 503/1013. Default: what the worker "
        "carries in real time, measured during the warm-up (server.scheduler.measure_capacity); "
        "16 without a warm-up.",
    )
    retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After seconds sent with 503.")
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Deadline of one request's work once its body has arrived (504); the upload "
        "has its own limit, upload_min_bytes_per_s.",
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="How long shutdown waits for requests in flight.")
    keep_alive_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Close a keep-alive connection idle this long; also how long a request's line and "
        "headers may take from the connection's start or their first byte (408).",
    )

    # --- input limits -------------------------------------------------------------------------------------
    max_body_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest request body, checked as it streams (413)."
    )
    upload_min_bytes_per_s: int = Field(
        16 * 1024,
        ge=1,
        description="Slowest average rate a request body may arrive at once upload_grace_s have passed (408). "
        "Bodies are read before a work slot is taken, so a slow sender costs a connection only.",
    )
    upload_grace_s: float = Field(
        5.0, gt=0, description="Seconds an upload may take before upload_min_bytes_per_s applies (408)."
    )
    max_upload_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1024,
        description="Bytes of request bodies being received at once, over all requests (503 beyond it): "
        "with max_concurrency x max_body_bytes for admitted work, the bound on body memory.",
    )
    max_duration_s: float = Field(300.0, gt=0, description="Longest audio accepted or produced, from headers (413).")
    max_input_samples: int = Field(
        32_000_000, ge=1, description="Most decoded input samples (frames x channels) per request (413)."
    )
    min_sample_rate: int = Field(4000, ge=1, description="Lowest input sample rate accepted (422).")
    max_sample_rate: int = Field(192_000, ge=1, description="Highest input sample rate accepted (422).")
    max_channels: int = Field(8, ge=1, le=1024, description="Most input channels accepted (422).")

    # --- streaming ----------------------------------------------------------------------------------------
    ws_max_message_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest WebSocket message (an error message, then close 1009)."
    )
    ws_idle_timeout_s: float = Field(60.0, gt=0, description="Close a stream silent for this long (close 1008).")
    max_stream_duration_s: float = Field(3600.0, gt=0, description="Most audio one stream may carry (close 1008).")
    stream_max_lag_s: float = Field(
        1.0,
        gt=0,
        description="Close a stream whose output falls this far behind real time (close 1013).",
    )

    # --- network ------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address uvicorn binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port uvicorn binds (0: any free port).")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.models:
            raise ValueError("models must name at least one model id or directory")
        if self.min_sample_rate > self.max_sample_rate:
            raise ValueError("min_sample_rate must not exceed max_sample_rate")
        if self.max_upload_bytes < self.max_body_bytes:
            raise ValueError("max_upload_bytes must be at least max_body_bytes, or a largest body never fits")
        return self

    @property
    def default_model(self) -> str:
        return self.models[0]

    def resolved_pool_size(self) -> int:
        """Worker threads for model work: sized to the CPU (or one per GPU device)."""
        if self.pool_size is not None:
            return self.pool_size
        if not self.device.startswith("cpu"):
            return 1
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cpus // self.torch_threads)
