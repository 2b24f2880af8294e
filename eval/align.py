"""Delay estimation by cross-correlation and trimming of a decoded signal against its reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENVELOPE_WINDOW = 160
"""Samples (10 ms at 16 kHz) of the RMS envelope used for the coarse delay search."""

REFINE_LAG = 80
"""Samples (5 ms at 16 kHz) either side of the coarse delay searched on the waveform itself."""

MIN_WAVEFORM_CORRELATION = 0.5
"""Normalised waveform correlation below which the envelope delay is kept (the waveform peak is noise)."""


@dataclass(frozen=True)
class Aligned:
    """A reference and a decoded signal shifted and trimmed to the same length.

    ``delay`` is in samples: positive when the decoded signal lags the reference
    (``deg[n + delay] ~ ref[n]``), negative when it leads.
    """

    ref: np.ndarray
    deg: np.ndarray
    delay: int


def _xcorr(ref: np.ndarray, deg: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """``sum_n deg[n + k] * ref[n]`` for each lag ``k`` in ``lags`` (via FFT)."""
    n = ref.size + deg.size - 1
    nfft = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(deg, nfft) * np.conj(np.fft.rfft(ref, nfft)), nfft)
    return xc[lags % nfft]  # negative lags wrap to the end of the buffer


def _envelope(x: np.ndarray) -> np.ndarray:
    window = min(ENVELOPE_WINDOW, x.size)
    env = np.sqrt(np.maximum(np.convolve(x * x, np.full(window, 1.0 / window), mode="same"), 0.0))
    return env - env.mean()


def _best(values: np.ndarray, lags: np.ndarray, default: int) -> int:
    return int(lags[np.argmax(values)]) if np.any(values) else default


def estimate_delay(ref: np.ndarray, deg: np.ndarray, max_lag: int) -> int:
    """The delay of ``deg`` against ``ref`` in samples, searched within ``[-max_lag, max_lag]``.

    Two steps: the peak of the cross-correlation of the 10 ms RMS envelopes (robust for parametric
    codecs such as Codec 2, whose waveform does not follow the input), then the peak of the waveform
    cross-correlation within 5 ms of it (sample-exact for waveform codecs such as Opus), kept only
    when that peak is a real match (normalised correlation >= 0.5).

    Args:
        ref: reference signal, [T1] float.
        deg: decoded signal, [T2] float.
        max_lag: the search bound in samples (>= 0).
    """
    if max_lag < 0:
        raise ValueError(f"max_lag must be >= 0, got {max_lag}")
    ref = np.asarray(ref, dtype=np.float64)
    deg = np.asarray(deg, dtype=np.float64)
    if ref.size == 0 or deg.size == 0:
        return 0
    lags = np.arange(-max_lag, max_lag + 1)
    # Lags outside the overlap of the two signals would only compare against padding.
    lags = lags[(lags > -ref.size) & (lags < deg.size)]
    coarse = _best(_xcorr(_envelope(ref), _envelope(deg), lags), lags, 0)
    near = lags[np.abs(lags - coarse) <= REFINE_LAG]
    values = _xcorr(ref, deg, near)
    fine = _best(values, near, coarse)
    energy = np.sqrt(np.dot(ref, ref) * np.dot(deg, deg))
    if energy == 0.0 or values.max() < MIN_WAVEFORM_CORRELATION * energy:
        return coarse
    return fine


def align(ref: np.ndarray, deg: np.ndarray, max_lag: int) -> Aligned:
    """Estimate the delay of ``deg`` (bounded by ``max_lag`` samples), shift it and trim both to the common length."""
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    deg = np.asarray(deg, dtype=np.float64).reshape(-1)
    delay = estimate_delay(ref, deg, max_lag)
    if delay >= 0:
        deg = deg[delay:]
    else:
        ref = ref[-delay:]
    n = min(ref.size, deg.size)
    return Aligned(ref=ref[:n], deg=deg[:n], delay=delay)
