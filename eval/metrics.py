"""Objective speech metrics on 16 kHz mono float arrays: PESQ, STOI, ESTOI, SI-SDR, multi-scale mel distance."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import soxr

from codec.errors import AudioError
from eval import SAMPLE_RATE
from eval.align import align

METRICS = ("pesq_wb", "pesq_nb", "stoi", "estoi", "si_sdr", "mel_distance")
"""Names of the scores in :class:`Scores`, in report order."""

MEL_SCALES = ((128, 10), (256, 20), (512, 40), (1024, 80), (2048, 80))
"""(window length, mel bands) per scale of :func:`mel_distance`; hop = window / 4, 0-8 kHz."""


@dataclass
class Scores:
    """Scores of one decoded signal against its reference, after alignment.

    A metric that cannot be computed (silent or too-short input) is NaN and ``notes[name]`` says why;
    ``pesq_nb`` is NaN with a note unless narrowband PESQ was requested.
    """

    pesq_wb: float
    pesq_nb: float
    stoi: float
    estoi: float
    si_sdr: float
    mel_distance: float
    delay_ms: float
    scored_seconds: float
    notes: dict[str, str] = field(default_factory=dict)


def si_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB of ``est`` [T] against ``ref`` [T] (both zero-meaned)."""
    ref = np.asarray(ref, dtype=np.float64) - np.mean(ref)
    est = np.asarray(est, dtype=np.float64) - np.mean(est)
    energy = float(np.dot(ref, ref))
    if ref.shape != est.shape or energy == 0.0 or not np.any(est):
        return math.nan
    target = (np.dot(est, ref) / energy) * ref
    noise = est - target
    signal_power = float(np.dot(target, target))
    # A floor 200 dB down keeps an exact (scaled) copy finite, so results stay valid JSON.
    noise_power = max(float(np.dot(noise, noise)), signal_power * 1e-20, np.finfo(np.float64).tiny)
    return float(10.0 * np.log10(max(signal_power, np.finfo(np.float64).tiny) / noise_power))


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=None)
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular HTK-mel filters from 0 Hz to Nyquist, [n_mels, n_fft // 2 + 1], each with unit peak."""
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (center - lower)
    falling = (upper - freqs[None, :]) / (upper - center)
    bank = np.maximum(0.0, np.minimum(rising, falling))
    if not np.all(bank.sum(axis=1) > 0):
        raise ValueError(f"{n_mels} mel bands leave an empty filter with n_fft={n_fft}")
    return bank


def _log_mel(x: np.ndarray, n_fft: int, n_mels: int) -> np.ndarray:
    hop = n_fft // 4
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    spec = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=-1))
    mel = spec @ mel_filterbank(n_fft, n_mels).T
    return np.log10(np.maximum(mel, 1e-5))


def mel_distance(ref: np.ndarray, deg: np.ndarray) -> float:
    """Mean absolute difference of log10 mel magnitudes, averaged over :data:`MEL_SCALES` (0 = identical)."""
    ref = np.asarray(ref, dtype=np.float64)
    deg = np.asarray(deg, dtype=np.float64)
    if ref.shape != deg.shape or ref.size == 0:
        return math.nan
    return float(np.mean([np.mean(np.abs(_log_mel(ref, w, m) - _log_mel(deg, w, m))) for w, m in MEL_SCALES]))


def _pesq(ref: np.ndarray, deg: np.ndarray, sample_rate: int, mode: str) -> tuple[float, str | None]:
    from pesq import PesqError, pesq

    if not np.any(ref):
        return math.nan, "silent reference"
    if not np.any(deg):
        return math.nan, "silent decoded signal"
    try:
        return float(pesq(sample_rate, ref, deg, mode)), None
    except (PesqError, ValueError) as exc:
        reason = exc.args[0] if exc.args else ""
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        return math.nan, f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def _stoi(ref: np.ndarray, deg: np.ndarray, extended: bool) -> tuple[float, str | None]:
    from pystoi import stoi

    if not np.any(ref):
        return math.nan, "silent reference"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(ref, deg, SAMPLE_RATE, extended=extended))
    for w in caught:
        if "Not enough STFT frames" in str(w.message):
            return math.nan, "too little non-silent audio for STOI (needs ~384 ms of speech)"
    return value, None


def _check(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise AudioError(f"{name} must be a mono 1-D array [T], got shape {tuple(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{name} contains NaN or infinite samples")
    return x


def score(
    ref: np.ndarray,
    deg: np.ndarray,
    max_delay_ms: float = 100.0,
    pesq_nb: bool = False,
) -> Scores:
    """Align ``deg`` to ``ref`` (both [T] at 16 kHz) by cross-correlation within +-``max_delay_ms``, then score it.

    Args:
        ref: the original signal, [T1] float in [-1, 1].
        deg: the decoded signal, [T2] float in [-1, 1]; its length may differ from ``ref``.
        max_delay_ms: the delay search bound; both signals are trimmed to their common length after the shift.
        pesq_nb: also compute narrowband PESQ on copies resampled to 8 kHz.
    """
    ref = _check("reference", ref)
    deg = _check("decoded signal", deg)
    a = align(ref, deg, max_lag=int(round(max_delay_ms * SAMPLE_RATE / 1000)))
    notes: dict[str, str] = {}
    pesq_wb, why = _pesq(a.ref, a.deg, SAMPLE_RATE, "wb")
    if why:
        notes["pesq_wb"] = why
    nb = math.nan
    if pesq_nb:
        nb, why = _pesq(soxr.resample(a.ref, SAMPLE_RATE, 8000), soxr.resample(a.deg, SAMPLE_RATE, 8000), 8000, "nb")
        if why:
            notes["pesq_nb"] = why
    else:
        notes["pesq_nb"] = "not requested"
    stoi_v, why = _stoi(a.ref, a.deg, extended=False)
    if why:
        notes["stoi"] = why
    estoi_v, why = _stoi(a.ref, a.deg, extended=True)
    if why:
        notes["estoi"] = why
    sdr = si_sdr(a.ref, a.deg)
    if math.isnan(sdr):
        notes["si_sdr"] = "silent reference" if not np.any(a.ref) else "silent decoded signal"
    mel = mel_distance(a.ref, a.deg)
    if math.isnan(mel):
        notes["mel_distance"] = "empty signal after alignment"
    return Scores(
        pesq_wb=pesq_wb,
        pesq_nb=nb,
        stoi=stoi_v,
        estoi=estoi_v,
        si_sdr=sdr,
        mel_distance=mel,
        delay_ms=1000.0 * a.delay / SAMPLE_RATE,
        scored_seconds=a.ref.size / SAMPLE_RATE,
        notes=notes,
    )
