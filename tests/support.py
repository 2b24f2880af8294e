"""Test support (not shipped in the package): a tiny codec, a gated one, token comparison; test audio, the
loopback server and headless Chromium come from `bench.support`."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.support import (  # noqa: F401 (the tests' names for the kit the bench scripts use)
    CHROMIUM_FLAGS,
    REPO,
    LoopbackServer,
    audio_bytes,
    chromium_missing,
    free_port,
    headless_chromium,
    real_recording,
    speech_like,
)
from codec.checkpoint import load_pretrained, save_model
from codec.model import SimVQCodec
from codec.pretrained import Pretrained

TINY_CONFIG: dict[str, Any] = dict(
    encoder_dim=32,
    encoder_layers=1,
    decoder_dim=32,
    decoder_layers=1,
    kernel_size=3,
    expansion=2,
    latent_dim=8,
    n_stages=4,
    codebook_size=64,
    code_dim=8,
    whiten_codes=True,
    principal_maps=False,
    init_from_data=False,
    phase="absolute",
    straight_through="stage",
    quantize_fraction=1.0,
    pitch_prior=False,
    rephase_iters=0,
    advance_features=False,
)


MAX_FLIPPED_FRAMES = 0.02
"""Frames allowed to differ between two encodes of the same audio whose float sums ran in another order
(another CPU, a stream cut into other chunks: the matrix products take other kernels for other row counts).
The nearest-neighbour search can then flip between two codes equidistant to within rounding, and the later
residual stages inherit the flip; a changed model or a broken code path moves most frames, rounding a handful."""


def assert_same_tokens(codes: Any, expected: Any, what: str) -> None:
    """`codes` equal `expected` ([stages, frames]) but for near-ties in at most `MAX_FLIPPED_FRAMES` of frames."""
    codes, expected = np.asarray(codes), np.asarray(expected)
    assert codes.shape == expected.shape, f"{codes.shape} tokens, {what} has {expected.shape}"
    flipped = np.any(codes != expected, axis=0)
    assert flipped.mean() <= MAX_FLIPPED_FRAMES, f"{flipped.sum()} of {flipped.size} frames differ from {what}"


def make_tiny_model(out_dir: str | Path, model_id: str = "tiny-test", seed: int = 0, **overrides: Any) -> Pretrained:
    """A randomly initialised small SimVQCodec saved as a release directory and loaded back, so it has
    a weights sha256 and a model id like a shipped model (16 kHz, 320-sample frames, 4 x 64 codes)."""
    torch.manual_seed(seed)
    model = SimVQCodec(**{**TINY_CONFIG, **overrides}).eval()
    save_model(model, out_dir, {"note": "test model"}, model_id=model_id, trained=False)
    return load_pretrained(out_dir)


class GatedCodec(SimVQCodec):
    """Offline encode waits for the class attribute `gate` (streaming calls do not): holds work in flight."""

    gate: threading.Event

    def encode(self, wav, n_stages=None):  # noqa: ANN001, ANN201 - same signature as SimVQCodec.encode
        if not self.is_streaming:
            self.gate.wait(60)
        return super().encode(wav, n_stages)


def gated(release: Pretrained) -> Pretrained:
    """`release` (same weights, hash and id) with a copy of its model whose offline encode blocks until
    `.model.gate.set()`.

    The gate is a class attribute of a fresh subclass: one gate per call.
    """
    cls = type("Gated", (GatedCodec,), {"gate": threading.Event()})
    clone = cls(**release.model.config).eval()
    clone.load_state_dict(release.model.state_dict())
    return dataclasses.replace(release, model=clone)


def wait_ready(client: httpx.Client, timeout: float = 180) -> None:
    """Until the service answers /readyz with 200 (the model loads and warms up in the background)."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.05)
