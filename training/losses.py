"""Reconstruction and adversarial losses: multi-scale log-mel L1, compressed complex STFT MSE, direct targets
for the decoder's spectrum (log magnitude, phase advance), hinge/LSGAN."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codec.features import causal_stft, hann_window


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular mel filters [n_mels, n_fft // 2 + 1] float32 from 0 Hz to Nyquist, Slaney's scale and area norm.

    Slaney's Auditory Toolbox scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (a factor of 6.4
    per 27 mels); each filter is divided by its width in Hz so all have the same area. These are the filters
    `librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)` returns (its defaults; a test checks),
    computed here so that training needs neither librosa nor its numba.
    """
    f_sp, knee_hz = 200.0 / 3.0, 1000.0
    knee_mel, log_step = knee_hz / f_sp, math.log(6.4) / 27.0

    def to_mel(hz: float) -> float:
        return hz / f_sp if hz < knee_hz else knee_mel + math.log(hz / knee_hz) / log_step

    mels = np.linspace(0.0, to_mel(sample_rate / 2.0), n_mels + 2)
    edges = np.where(mels < knee_mel, mels * f_sp, knee_hz * np.exp(log_step * (mels - knee_mel)))
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    widths = np.diff(edges)
    rising = (bins[None, :] - edges[:-2, None]) / widths[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)  # rounded twice, as librosa does
    return (triangles * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


def _stft(audio: torch.Tensor, window: torch.Tensor, hop: int) -> torch.Tensor:
    """[B, 1, T] -> [B, freq, frames] complex STFT in float32, FFT size = the window's length."""
    return torch.stft(audio.float().flatten(0, 1), window.shape[0], hop, window=window, return_complex=True)


class MultiScaleMelLoss(nn.Module):
    """Mean over FFT sizes of the L1 distance between log-mel magnitude spectrograms.

    Args:
        sample_rate: Hz.
        n_ffts: FFT (and Hann window) sizes; hop = n_fft / 4.
        n_mels: mel bands for each FFT size (Slaney filters, `slaney_mel_filters`).
        floor: magnitude floor before the log.
    Inputs `output, target` are [B, 1, T]; the result is a scalar.
    """

    def __init__(self, sample_rate: int, n_ffts=(256, 512, 1024, 2048), n_mels=(32, 64, 80, 128), floor=1e-5):
        super().__init__()
        self.n_ffts = tuple(n_ffts)
        self.floor = floor
        for n_fft, mels in zip(self.n_ffts, n_mels):
            fb = slaney_mel_filters(sample_rate, n_fft, mels)
            self.register_buffer(f"fb_{n_fft}", torch.from_numpy(fb).float(), persistent=False)
            self.register_buffer(f"win_{n_fft}", torch.hann_window(n_fft), persistent=False)

    def log_mel(self, audio: torch.Tensor, n_fft: int) -> torch.Tensor:
        """[B, 1, T] -> [B, n_mels, frames] natural-log mel magnitudes."""
        spec = _stft(audio, getattr(self, f"win_{n_fft}"), n_fft // 4).abs()
        mel = getattr(self, f"fb_{n_fft}") @ spec
        return mel.clamp_min(self.floor).log()

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = [F.l1_loss(self.log_mel(output, n), self.log_mel(target, n)) for n in self.n_ffts]
        return torch.stack(losses).mean()


class ComplexSTFTLoss(nn.Module):
    """Mean over resolutions of the MSE between power-law compressed complex STFTs, |X|^p e^{i angle X}.

    Unlike mel losses this compares phase, which gives the decoder a direct phase target.

    Args:
        n_ffts: FFT sizes.
        hops: hop of each FFT size.
        power: compression exponent p (0.3).
        eps: added to |X|^2 so the compression has a finite gradient at 0.
    Inputs `output, target` are [B, 1, T]; the result is a scalar.
    """

    def __init__(self, n_ffts=(320, 640), hops=(80, 160), power: float = 0.3, eps: float = 1e-8):
        super().__init__()
        self.resolutions = tuple(zip(n_ffts, hops))
        self.power = power
        self.eps = eps
        for n_fft in n_ffts:
            self.register_buffer(f"win_{n_fft}", torch.hann_window(n_fft), persistent=False)

    def compressed(self, audio: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
        """[B, 1, T] -> [B, freq, frames, 2] real and imaginary parts of the compressed STFT."""
        parts = torch.view_as_real(_stft(audio, getattr(self, f"win_{n_fft}"), hop))
        power = parts.pow(2).sum(-1, keepdim=True) + self.eps
        return parts * power.pow((self.power - 1.0) / 2.0)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = [F.mse_loss(self.compressed(output, n, h), self.compressed(target, n, h)) for n, h in self.resolutions]
        return torch.stack(losses).mean()


class LinearSTFTLoss(nn.Module):
    """Multi-resolution spectral convergence, ||Y - X|| / ||Y|| between linear-frequency STFT magnitudes.

    Long windows resolve each harmonic of a voice across the whole band, where mel bands above about 1 kHz
    are wider than the harmonic spacing, and linear magnitudes weigh the loud harmonics most. When
    overlapping synthesis frames disagree in phase, the harmonics smear between bins of these spectra. Over
    the oracle's mixes this distance ranks them as PESQ-WB does where the mel loss does not
    (docs/architecture.md).

    Args:
        n_ffts: FFT (and Hann window) sizes; hop = n_fft / 4.
    Inputs `output, target` are [B, 1, T]; the result is a scalar: the mean over resolutions and items.
    """

    def __init__(self, n_ffts=(512, 1024, 2048)):
        super().__init__()
        self.n_ffts = tuple(n_ffts)
        for n_fft in self.n_ffts:
            self.register_buffer(f"win_{n_fft}", torch.hann_window(n_fft), persistent=False)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = []
        for n in self.n_ffts:
            x, y = (_stft(a, getattr(self, f"win_{n}"), n // 4).abs() for a in (output, target))
            norm = torch.linalg.vector_norm(y, dim=(1, 2)).clamp_min(1e-8)
            losses.append((torch.linalg.vector_norm(y - x, dim=(1, 2)) / norm).mean())
        return torch.stack(losses).mean()


class SpectrumLoss(nn.Module):
    """Direct targets for the decoder's output spectrum, taken from the input's STFT in the same framing.

    The mel and complex losses judge the waveform, in which a wrong phase also smears the magnitudes; these
    two judge the decoder's outputs themselves (APNet, Ai & Ling 2023, does the same for a vocoder):
      - "spec/mag": L1 between log magnitudes (floored at `floor`).
      - "spec/phase": anti-wrapped L1 (distance on the circle) between each bin's phase advance from one
        sub-frame to the next and the input's, weighted by the input's magnitude**`weight_power` (normalised
        to mean 1 per item) so that the harmonics count and the phase of noise and silence hardly does.
        Right advances keep partials coherent whatever their absolute phase.

    Args:
        synthesis: the model's `ISTFTSynthesis` (framing, and how its phase outputs are read).
        floor: magnitude floor before the log.
        weight_power: exponent of the magnitude weighting of the phase term.
    `forward(spectrum, audio)`: `spectrum` `[B, F, in_dim]` (`CodecOutput.spectrum`), `audio` `[B, 1, T]` the
    input; returns `{"spec/mag": scalar, "spec/phase": scalar}`.
    """

    def __init__(self, synthesis: nn.Module, floor: float = 1e-4, weight_power: float = 0.5):
        super().__init__()
        self.synthesis, self.floor, self.weight_power = synthesis, floor, weight_power
        self.register_buffer("window", hann_window(synthesis.n_fft), persistent=False)  # the analysis window

    def forward(self, spectrum: torch.Tensor, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        syn = self.synthesis
        target = causal_stft(audio.float()[:, 0], self.window, syn.hop)
        log_mag, phase = syn.split(spectrum.float())
        target_mag = target.abs()
        mag_loss = F.l1_loss(torch.log(syn.magnitudes(log_mag) + self.floor), torch.log(target_mag + self.floor))
        advance = syn.phase_advances(phase)
        target_advance = target.angle().diff(dim=1)
        advance = advance[:, advance.shape[1] - target_advance.shape[1] :]  # absolute phases lack frame 0's
        weight = target_mag[:, 1:].pow(self.weight_power)
        weight = weight / weight.mean(dim=(1, 2), keepdim=True).clamp_min(1e-8)
        phase_loss = (wrapped_distance(advance, target_advance) * weight).mean()
        return {"spec/mag": mag_loss, "spec/phase": phase_loss}


def wrapped_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| on the circle, in [0, pi]."""
    d = a - b
    return (d - 2 * math.pi * torch.round(d / (2 * math.pi))).abs()


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: str = "hinge") -> torch.Tensor:
    """Mean over discriminators of the hinge or least-squares loss on real and generated logits."""
    losses = []
    for r, f in zip(real, fake):
        r, f = r.float(), f.float()
        if kind == "hinge":
            losses.append(F.relu(1 - r).mean() + F.relu(1 + f).mean())
        else:
            losses.append((1 - r).pow(2).mean() + f.pow(2).mean())
    return torch.stack(losses).mean()


def generator_loss(fake: list[torch.Tensor], kind: str = "hinge") -> torch.Tensor:
    """Mean over discriminators of the generator's adversarial loss on its logits."""
    losses = []
    for f in fake:
        f = f.float()
        losses.append(F.relu(1 - f).mean() if kind == "hinge" else (1 - f).pow(2).mean())
    return torch.stack(losses).mean()


def feature_loss(real_features: list[list[torch.Tensor]], fake_features: list[list[torch.Tensor]]) -> torch.Tensor:
    """Feature matching: mean over every discriminator layer of the L1 distance to the (detached) real features."""
    losses = [
        F.l1_loss(f.float(), r.detach().float())
        for real, fake in zip(real_features, fake_features)
        for r, f in zip(real, fake)
    ]
    return torch.stack(losses).mean()
