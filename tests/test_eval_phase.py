"""eval.phase: phases rebuilt from magnitudes (PGHI) and from an f0 track (harmonic), and the f0 track itself.

Each is judged by spectral convergence: play the exact magnitudes with the rebuilt phases, analyse the result
again, and compare its magnitudes with the ones played. Exact phases give 0; random ones about 0.65.
"""

import math

import numpy as np
import pytest
import torch

from codec.features import causal_stft, hann_window
from codec.synthesis import ISTFTSynthesis
from eval.phase import f0_track, harmonic_phase, pghi_phase

N_FFT, HOP, SR = 320, 80, 16000


def stft(x: np.ndarray) -> np.ndarray:
    return causal_stft(torch.from_numpy(x.astype(np.float32))[None], hann_window(N_FFT), HOP)[0].numpy()


def spectral_convergence(mag: np.ndarray, phase: np.ndarray) -> float:
    synthesis = ISTFTSynthesis(N_FFT, HOP, 4, "absolute")
    spectra = torch.stack([torch.from_numpy(np.log(mag)), torch.from_numpy(phase)], dim=1)[None].float()
    y = synthesis(spectra.reshape(1, -1, synthesis.in_dim))[0, 0].numpy()
    y = np.concatenate([y, np.zeros(mag.shape[0] * HOP - len(y))])
    again = np.abs(stft(y))
    inner = slice(8, -8)  # the first and last frames lack their overlapping neighbours
    return float(np.linalg.norm(again[inner] - mag[inner]) / np.linalg.norm(mag[inner]))


@pytest.fixture(scope="module")
def voiced():
    """One second of an 11-harmonic tone whose f0 wavers 130-150 Hz, as a voice does; partials fall between bins."""
    t = np.arange(SR) / SR
    f0 = 140 + 10 * np.sin(2 * math.pi * 3 * t)
    cycles = 2 * math.pi * np.cumsum(f0) / SR
    x = 0.1 * sum(np.cos(h * cycles) / h for h in range(1, 12))
    mag = np.abs(stft(x)).astype(np.float64) + 1e-9
    centres = np.clip((np.arange(mag.shape[0]) + 1) * HOP - N_FFT // 2, 0, SR - 1)
    return x, mag, f0[centres]


def test_exact_phases_score_zero_and_random_ones_do_not(voiced):
    x, mag, _ = voiced
    assert spectral_convergence(mag, np.angle(stft(x)).astype(np.float64)) < 1e-4
    assert spectral_convergence(mag, np.random.default_rng(0).uniform(0, 2 * math.pi, mag.shape)) > 0.5


def test_pghi_rebuilds_a_consistent_phase_from_the_magnitudes_alone(voiced):
    _, mag, _ = voiced
    phase = pghi_phase(np.log(mag), N_FFT, HOP)
    assert phase.shape == mag.shape and np.isfinite(phase).all()
    assert spectral_convergence(mag, phase) < 0.2


def test_pghi_is_causal(voiced):
    _, mag, _ = voiced
    log_mag = np.log(mag)
    changed = log_mag.copy()
    changed[60:] += np.random.default_rng(1).normal(0, 1, changed[60:].shape)
    assert np.array_equal(pghi_phase(log_mag, N_FFT, HOP)[:60], pghi_phase(changed, N_FFT, HOP)[:60])


def test_harmonic_phase_needs_the_right_f0(voiced):
    _, mag, f0 = voiced
    rng = np.random.default_rng(0)
    assert spectral_convergence(mag, harmonic_phase(f0, mag.shape[1], N_FFT, HOP, SR, rng)) < 0.2
    assert spectral_convergence(mag, harmonic_phase(1.3 * f0, mag.shape[1], N_FFT, HOP, SR, rng)) > 0.5


def test_f0_track_follows_a_voice_and_calls_noise_unvoiced(voiced):
    x, mag, f0 = voiced
    track = f0_track(x, mag.shape[0], N_FFT, HOP, SR)
    assert track.shape == (mag.shape[0],)
    assert (track > 0).mean() > 0.9
    assert np.median(np.abs(track[track > 0] / f0[track > 0] - 1)) < 0.01
    noise = 0.05 * np.random.default_rng(1).standard_normal(SR)
    assert (f0_track(noise, mag.shape[0], N_FFT, HOP, SR) > 0).mean() < 0.1


def test_the_sent_f0_track_holds_each_frames_last_value_within_half_a_level_and_keeps_unvoiced():
    from eval.phase import sent_f0_track

    f0 = np.array([100.0, 101.0, 102.0, 103.0, 0.0, 0.0, 0.0, 0.0, 200.0, 0.0, 0.0, 300.0])
    sent = sent_f0_track(f0, 4, bits=10)
    assert len(sent) == len(f0)
    assert np.all(sent[:4] == sent[0]) and np.all(sent[4:8] == 0) and np.all(sent[8:] == sent[8])
    half_level = 0.5 * 1200 * math.log2(550 / 50) / (2**10 - 2)  # cents
    assert abs(1200 * math.log2(sent[0] / 103.0)) <= half_level + 1e-9
    assert abs(1200 * math.log2(sent[8] / 300.0)) <= half_level + 1e-9
    coarse = sent_f0_track(f0, 4, bits=5)
    assert abs(math.log2(coarse[0] / 103.0)) > abs(math.log2(sent[0] / 103.0))
