"""Our codec as an evaluation subject: real .tok bytes, speed, and per-stage codebook utilisation."""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import soxr

from eval import SAMPLE_RATE
from eval.peers import CodecRun

DEFAULT_STAGES = (1, 2, 3, 4, 6, 8, 12)

_MODELS: dict = {}  # model reference -> loaded codec.Pretrained, one per process


def get_model(ref: str | None, warn: bool = False):
    """Load (once per process) the model named by a preset id or directory, None for the default preset:
    a `codec.Pretrained` (`.model` is the SimVQCodec, in eval mode)."""
    key = ref or ""
    if key not in _MODELS:
        from codec.presets import load_model

        _MODELS[key] = load_model(ref, warn=warn)
    return _MODELS[key]


@dataclass(frozen=True)
class ModelSetting:
    """The model named ``ref`` (preset id or directory; None = default) run with its first ``n_stages`` stages.

    ``codec`` is the model id shown in reports; ``nominal_kbps`` the bitrate of the codes alone;
    ``codebook_sizes`` K_s of each stage used, for the utilisation histograms.
    """

    ref: str | None
    codec: str
    n_stages: int
    nominal_kbps: float
    codebook_sizes: tuple[int, ...]
    tools = ()

    @property
    def setting(self) -> str:
        return f"{self.n_stages}st"

    def run(self, wav: np.ndarray) -> CodecRun:
        """Encode ``wav`` [T] (16 kHz float) to real .tok bytes, read them back and decode them."""
        from codec.api import decode_array, encode_array
        from codec.tokfile import read_tok, write_tok

        model = get_model(self.ref)
        start = time.perf_counter()
        header, codes = encode_array(wav, SAMPLE_RATE, model, n_stages=self.n_stages)
        buf = io.BytesIO()
        write_tok(buf, header, codes)
        encode_seconds = time.perf_counter() - start
        data = buf.getvalue()
        start = time.perf_counter()
        header, codes = read_tok(io.BytesIO(data))
        decoded = decode_array(header, codes, model)
        decode_seconds = time.perf_counter() - start
        rate = model.model.sample_rate
        if rate != SAMPLE_RATE:
            decoded = soxr.resample(decoded, rate, SAMPLE_RATE)
        return CodecRun(
            decoded, len(data), float(header.payload_bytes), encode_seconds, decode_seconds, codes=np.asarray(codes)
        )


@dataclass(frozen=True)
class UnquantizedSetting:
    """The model named ``ref`` with its quantizer bypassed: the encoder's latent decoded as it is.

    Not a codec setting (nothing is transmitted, so it has no bitrate): the ceiling that the quantized
    settings are measured against, for models in training (docs/model-card.md)."""

    ref: str | None
    codec: str
    setting = "unquantized"
    nominal_kbps = math.nan
    tools = ()

    def run(self, wav: np.ndarray) -> CodecRun:
        import torch

        model = get_model(self.ref).model
        hop = model.hop_length
        padded = np.pad(wav, (0, -len(wav) % hop)).astype(np.float32)
        start = time.perf_counter()
        with torch.no_grad():
            latents = model.encode_latents(torch.from_numpy(padded)[None, None])
            encode_seconds = time.perf_counter() - start
            start = time.perf_counter()
            decoded = model.decode_latents(latents)[0, 0, : len(wav)].numpy()
        return CodecRun(decoded, math.nan, None, encode_seconds, time.perf_counter() - start)


def model_settings(
    ref: str | None, stages: list[int] | None = None, bitrates: list[float] | None = None
) -> list[ModelSetting]:
    """Settings for a list of stage counts or of bitrates in kbit/s (default: :data:`DEFAULT_STAGES` that fit).

    Loads the model in this process (with the untrained-model warning) and checks every value.
    """
    from codec.stages import resolve_stage_list

    release = get_model(ref, warn=True)
    model = release.model
    counts = resolve_stage_list(model, stages, bitrates)
    if counts is None:
        counts = [s for s in DEFAULT_STAGES if s <= model.n_stages] + [model.n_stages]
    name = release.model_id
    return [ModelSetting(ref, name, n, model.bitrate(n) / 1000, model.codebook_sizes[:n]) for n in sorted(set(counts))]


@dataclass(frozen=True)
class StageUsage:
    """Codebook use of one residual stage over the whole set: ``used`` of ``codebook_size`` codes at least once,
    ``perplexity`` = exp(entropy of the code histogram) (equals ``codebook_size`` for uniform use)."""

    stage: int
    used: int
    codebook_size: int
    utilisation: float
    perplexity: float


def count_codes(codes: np.ndarray, codebook_sizes: Sequence[int]) -> list[np.ndarray]:
    """One histogram [K_s] per stage of codes [S, F]."""
    return [np.bincount(row, minlength=k)[:k] for row, k in zip(np.asarray(codes), codebook_sizes, strict=True)]


def stage_usage(counts: Sequence[np.ndarray]) -> list[StageUsage]:
    """Per-stage utilisation and perplexity from summed histograms, one [K_s] per stage."""
    usage = []
    for s, row in enumerate(counts):
        row = np.asarray(row, dtype=np.float64)
        total = row.sum()
        p = row[row > 0] / total if total else np.zeros(0)
        perplexity = float(np.exp(-(p * np.log(p)).sum())) if p.size else math.nan
        used = int((row > 0).sum())
        usage.append(StageUsage(s + 1, used, row.size, used / row.size, perplexity))
    return usage
