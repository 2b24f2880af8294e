"""Phase from magnitudes and pitch alone: what a decoder's magnitudes are worth without its phases.

`eval.oracle` plays the decoder's (or the input's) magnitudes with phases built here, to tell whether the
magnitudes carry enough to be phased by signal processing, and what a pitch-driven decoder could reach:

    pghi_phase       phase-gradient heap integration, causal (Prusa and Holighaus, "real-time PGHI"):
                     the phase's time and frequency derivatives follow from the log magnitude's frequency
                     and time derivatives for a Gaussian window; integrating them from the loudest bins
                     outwards gives a consistent phase. On exact magnitudes it is nearly transparent.
    harmonic_phase   each bin follows the harmonic of an f0 track nearest to it, with the phase each
                     harmonic accumulates at its own frequency: what a decoder that knew the pitch would do.

Both are written for the codec's framing (`codec.features.causal_stft`): the phase of a frame is taken at its
first sample, so a partial at the frame's centre turns by -pi from one bin to the next. They are diagnostics
in plain numpy loops, not a decoder: a few seconds per minute of audio.
"""

from __future__ import annotations

import heapq
import math

import librosa
import numpy as np

# A Hann window of L samples behaves, for phase-gradient purposes, like a Gaussian exp(-pi t^2 / lambda)
# with lambda = 0.25645 L^2 (the value LTFAT uses for PGHI).
HANN_LAMBDA = 0.25645
F0_MIN, F0_MAX = 60.0, 450.0  # Hz: the pitch range searched, low male to high child voices


def pghi_phase(log_mag: np.ndarray, n_fft: int, hop: int, floor_db: float = 100.0) -> np.ndarray:
    """Log magnitudes `[frames, bins]` -> phases `[frames, bins]`, each frame from the past only.

    Bins more than `floor_db` below their frame's loudest get a random phase: their derivatives are noise.
    """
    frames, bins = log_mag.shape
    lam = HANN_LAMBDA * n_fft**2
    # time derivative of the phase (rad per hop): the bin's centre frequency, corrected by how the log
    # magnitude leans across frequency (a partial above the bin pulls its phase forward)
    d_freq = np.zeros_like(log_mag)
    d_freq[:, 1:-1] = (log_mag[:, 2:] - log_mag[:, :-2]) / 2
    time_grad = 2 * math.pi * hop / n_fft * np.arange(bins) + hop * n_fft / lam * d_freq
    # frequency derivative (rad per bin): -pi for the frame-start reference, corrected by how the log
    # magnitude rises over time (an onset after the frame's centre delays the phase); backward in time
    d_time = np.zeros_like(log_mag)
    d_time[1:] = log_mag[1:] - log_mag[:-1]
    freq_grad = -math.pi - lam / n_fft * d_time / hop
    floor = floor_db / 20 * math.log(10)
    rng = np.random.default_rng(0)
    phase = np.zeros_like(log_mag)
    for n in range(frames):
        todo = log_mag[n] > log_mag[n].max() - floor
        out = rng.uniform(0, 2 * math.pi, bins)
        # the heap holds (-loudness, from_current_frame, bin); the loudest known bin spreads its phase first
        heap = [(-log_mag[n - 1, k], False, k) for k in np.flatnonzero(todo)] if n else []
        heapq.heapify(heap)
        left = int(todo.sum())
        while left:
            if not heap:  # nothing known yet: the loudest open bin starts a new island with its random phase
                k = int(np.argmax(np.where(todo, log_mag[n], -np.inf)))
                todo[k], left = False, left - 1
                heapq.heappush(heap, (-log_mag[n, k], True, k))
                continue
            _, current, k = heapq.heappop(heap)
            if not current:  # from the previous frame, along time (trapezoid rule)
                if todo[k]:
                    out[k] = phase[n - 1, k] + (time_grad[n - 1, k] + time_grad[n, k]) / 2
                    todo[k], left = False, left - 1
                    heapq.heappush(heap, (-log_mag[n, k], True, k))
                continue
            for j, sign in ((k - 1, -1.0), (k + 1, 1.0)):  # to the neighbours in this frame, along frequency
                if 0 <= j < bins and todo[j]:
                    out[j] = out[k] + sign * (freq_grad[n, k] + freq_grad[n, j]) / 2
                    todo[j], left = False, left - 1
                    heapq.heappush(heap, (-log_mag[n, j], True, j))
        phase[n] = out
    return phase


def f0_track(audio: np.ndarray, frames: int, n_fft: int, hop: int, sample_rate: int) -> np.ndarray:
    """pYIN's f0 (Hz, 0 where unvoiced) at the centre of each of `frames` causal STFT frames."""
    f0, voiced, _ = librosa.pyin(
        audio.astype(np.float64),
        fmin=F0_MIN,
        fmax=F0_MAX,
        sr=sample_rate,
        frame_length=1024,
        hop_length=hop,
        center=True,
    )
    # causal frame n covers [(n+1)*hop - n_fft, (n+1)*hop); pYIN's frame i is centred on sample i*hop
    index = np.clip(np.arange(frames) + 1 - n_fft // (2 * hop), 0, len(f0) - 1)
    return np.where(voiced[index], np.nan_to_num(f0[index]), 0.0)


def harmonic_phase(
    f0: np.ndarray,
    bins: int,
    n_fft: int,
    hop: int,
    sample_rate: int,
    rng: np.random.Generator,
    unvoiced: np.ndarray | None = None,
) -> np.ndarray:
    """An f0 track `[frames]` (0 = unvoiced) -> phases `[frames, bins]`.

    Voiced frames: harmonic h turns by 2 pi h f0 per second (f0 averaged over the hop) from a random start at
    each voicing onset, and bin k takes the phase of its nearest harmonic, shifted by the frame-start
    reference. Unvoiced frames: `unvoiced` `[frames, bins]` where given, else random phases.
    """
    harmonics = np.arange(int(sample_rate / 2 / F0_MIN) + 2)  # enough for the lowest pitch up to Nyquist
    k = np.arange(bins)
    theta = np.zeros(len(harmonics))
    phase = rng.uniform(0, 2 * math.pi, (len(f0), bins)) if unvoiced is None else unvoiced.copy()
    for n, f in enumerate(f0):
        if f <= 0:
            continue
        if n and f0[n - 1] > 0:
            theta = theta + 2 * math.pi * harmonics * (f + f0[n - 1]) / 2 * hop / sample_rate
        else:
            theta = rng.uniform(0, 2 * math.pi, len(harmonics))
        h = np.clip(np.round(k * sample_rate / n_fft / f), 1, len(harmonics) - 1).astype(int)
        phase[n] = theta[h] - math.pi * (k - h * f * n_fft / sample_rate)
    return phase


def sent_f0_track(f0: np.ndarray, frames_per_step: int, bits: int = 10) -> np.ndarray:
    """A causal f0 track per sub-frame `[N]` (0 = unvoiced) -> what an f0 side stream of `bits` per codec frame
    would carry: the value of each frame's last sub-frame, quantised on a log scale over 50-550 Hz
    (2**bits - 1 levels, 0 kept for unvoiced), held over the frame's sub-frames."""
    low, high = math.log(50.0), math.log(550.0)
    levels = 2**bits - 2
    last = f0[frames_per_step - 1 :: frames_per_step]
    level = np.round((np.log(np.clip(last, 50.0, 550.0)) - low) / (high - low) * levels)
    sent = np.where(last > 0, np.exp(low + level / levels * (high - low)), 0.0)
    return np.repeat(sent, frames_per_step)[: len(f0)]
