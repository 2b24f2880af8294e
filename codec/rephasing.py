"""The played re-phasing compiled for the CPU: `ISTFTSynthesis`'s steps (`rephase_iters`) at inference.

A step re-phases 4 sub-frames of 161 bins from what was played before it, so the steps run one after another:
3,000 a minute of audio. In PyTorch a step is about a hundred small operations, and their dispatch, not their
arithmetic, is what it costs. Here the whole loop is one compiled function (numba, with pocketfft's FFTs
through rocket-fft), which releases the GIL while it runs.

It computes what `ISTFTSynthesis._played` computes, with other FFT and cosine kernels: one step agrees with
PyTorch's to rounding, and over many steps the running phases drift apart as they do between PyTorch and the
ONNX export: the same sound, not the same samples (tests/test_rephasing.py). Training (gradients), other
devices and dtypes, and tracing run PyTorch's steps (`codec.synthesis.runs_compiled`). Rows run one after
another and each step's FFTs are calls of their own, so a row's samples do not depend on the rest of its
batch (`codec.batched`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import rocket_fft  # noqa: F401  (registers numpy.fft with numba)
import torch
from torch import Tensor

TWO_PI = 2 * math.pi


def _compiled(fn):
    """`fn` compiled on first use (seconds), without the GIL, and cached on disk where numba finds a writable
    folder (NUMBA_CACHE_DIR, beside this module, or the user's cache folder); else compiled once a process."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # no writable cache folder
        return numba.njit(nogil=True)(fn)


def played(
    mag: Tensor,
    deviation: Tensor,
    centre_advance: Tensor,
    phase: Tensor,
    tail: Tensor,
    window: Tensor,
    analysis_window: Tensor,
    hop: int,
    frames_per_step: int,
    iters: int,
    carry_share: float,
) -> tuple[Tensor, Tensor]:
    """`ISTFTSynthesis._played`'s samples from magnitudes and advance deviations `[B, N, bins]`, each bin's
    centre advance `[bins]` (float64), the running phase `[B, bins]` (float64) and the pending sums `tail`
    `[B, delay]`: the samples `[B, N * hop + delay]` (the last `delay` the next tail) and the next running
    phase."""
    if iters < 1:
        raise ValueError(f"the compiled steps re-phase at least once, got iters={iters}")
    rows, frames, _ = mag.shape
    out = np.empty((rows, frames * hop + tail.shape[1]), np.float32)
    phase = phase.contiguous().numpy().copy()  # moved on in place
    _played_steps(
        mag.contiguous().numpy(),
        deviation.contiguous().numpy(),
        centre_advance.numpy(),
        phase,
        tail.contiguous().numpy(),
        window.numpy(),
        analysis_window.numpy(),
        hop,
        frames_per_step,
        iters,
        carry_share,
        out,
    )
    return torch.from_numpy(out), torch.from_numpy(phase)


@_compiled
def _wrapped(x):
    """x in [0, 2 pi): `torch.remainder(x, 2 pi)` to rounding, a tenth of the cost of numba's `%`."""
    return x - TWO_PI * math.floor(x / TWO_PI)


@_compiled
def _overlap_add(spectra, window, pending, hop, sounding):
    """Sub-frames -> `sounding`: the pending sums plus each windowed inverse FFT at its place."""
    frames = np.fft.irfft(spectra, window.shape[0])  # one call for the step's sub-frames, whatever the batch
    sounding[:] = 0.0
    sounding[: pending.shape[0]] = pending
    for k in range(frames.shape[0]):
        for i in range(frames.shape[1]):
            sounding[k * hop + i] += np.float32(frames[k, i] * window[i])


@_compiled
def _rephase(sounding, analysis_window, hop, mag, spectra, last_phase, windowed):
    """`spectra` <- the phases of what `sounding` holds at each sub-frame, with magnitudes `mag`; `last_phase`
    <- the last sub-frame's phases (float64). A silent bin takes phase 0, as in `unit_phase`."""
    n, bins = spectra.shape
    for k in range(n):
        for i in range(windowed.shape[1]):
            windowed[k, i] = sounding[k * hop + i] * analysis_window[i]
    heard = np.fft.rfft(windowed)
    for k in range(n):
        for f in range(bins):
            re, im = np.float64(heard[k, f].real + np.float32(1e-30)), np.float64(heard[k, f].imag)
            norm = math.sqrt(re * re + im * im)
            spectra[k, f] = complex(re / norm * mag[k, f], im / norm * mag[k, f])
            if k == n - 1:
                last_phase[f] = math.atan2(im, re)


@_compiled
def _played_steps(mag, deviation, centre_advance, phase, tail, window, analysis_window, hop, n, iters, share, out):
    """Writes `out` and moves `phase` on, row after row, step after step (see `played`)."""
    rows, frames, bins = mag.shape
    delay = tail.shape[1]
    advanced = n * hop  # samples a step completes
    advance = np.empty(bins)  # from the step's start
    own = np.empty((n, bins))
    spectra = np.empty((n, bins), np.complex64)
    last_phase = np.empty(bins)
    sounding = np.empty(advanced + delay, np.float32)
    windowed = np.empty((n, window.shape[0]), np.float32)
    for b in range(rows):
        pending = tail[b].copy()
        for t in range(frames // n):
            step_mag = mag[b, t * n : (t + 1) * n]
            for k in range(n):  # the decoder's own phases: the running phase plus its advances
                for f in range(bins):
                    sub_advance = np.float64(deviation[b, t * n + k, f]) + centre_advance[f]
                    advance[f] = advance[f] + sub_advance if k else sub_advance
                    own[k, f] = _wrapped(phase[b, f] + advance[f])
                    angle = np.float32(own[k, f])
                    spectra[k, f] = complex(step_mag[k, f] * math.cos(angle), step_mag[k, f] * math.sin(angle))
            _overlap_add(spectra, window, pending, hop, sounding)
            for _ in range(iters):  # what the sub-frames sound like after what was played: its phases, our magnitudes
                _rephase(sounding, analysis_window, hop, step_mag, spectra, last_phase, windowed)
                _overlap_add(spectra, window, pending, hop, sounding)
            out[b, t * advanced : (t + 1) * advanced] = sounding[:advanced]
            pending = sounding[advanced:].copy()
            for f in range(bins):  # carried_phase: part of the way to the phase played, the short way round
                start = own[n - 1, f]
                correction = _wrapped(last_phase[f] - start + math.pi) - math.pi
                phase[b, f] = start + share * correction
        out[b, (frames // n) * advanced :] = pending
