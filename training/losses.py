"""Reconstruction and adversarial losses: multi-scale log-mel L1, compressed complex STFT MSE, hinge/LSGAN."""

from __future__ import annotations

import librosa
import torch
import torch.nn.functional as F
from torch import nn


class MultiScaleMelLoss(nn.Module):
    """Mean over FFT sizes of the L1 distance between log-mel magnitude spectrograms.

    Args:
        sample_rate: Hz.
        n_ffts: FFT (and Hann window) sizes; hop = n_fft / 4.
        n_mels: mel bands for each FFT size (librosa Slaney filters).
        floor: magnitude floor before the log.
    Inputs `output, target` are [B, 1, T]; the result is a scalar.
    """

    def __init__(self, sample_rate: int, n_ffts=(256, 512, 1024, 2048), n_mels=(32, 64, 80, 128), floor=1e-5):
        super().__init__()
        self.n_ffts = tuple(n_ffts)
        self.floor = floor
        for n_fft, mels in zip(self.n_ffts, n_mels):
            fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=mels)
            self.register_buffer(f"fb_{n_fft}", torch.from_numpy(fb).float(), persistent=False)
            self.register_buffer(f"win_{n_fft}", torch.hann_window(n_fft), persistent=False)

    def log_mel(self, audio: torch.Tensor, n_fft: int) -> torch.Tensor:
        """[B, 1, T] -> [B, n_mels, frames] natural-log mel magnitudes."""
        spec = torch.stft(
            audio.float().flatten(0, 1), n_fft, n_fft // 4, window=getattr(self, f"win_{n_fft}"), return_complex=True
        ).abs()
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
        spec = torch.stft(
            audio.float().flatten(0, 1), n_fft, hop, window=getattr(self, f"win_{n_fft}"), return_complex=True
        )
        parts = torch.view_as_real(spec)
        power = parts.pow(2).sum(-1, keepdim=True) + self.eps
        return parts * power.pow((self.power - 1.0) / 2.0)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = [
            F.mse_loss(self.compressed(output, n, h), self.compressed(target, n, h)) for n, h in self.resolutions
        ]
        return torch.stack(losses).mean()


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
