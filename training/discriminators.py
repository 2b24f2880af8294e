"""Small multi-period and multi-resolution STFT discriminators: HiFi-GAN designs, sized for CPU training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

LEAK = 0.1


@dataclass
class DiscriminatorOutput:
    """Logits and intermediate features of every sub-discriminator, in the same order.

    Args:
        logits: one [B, ...] tensor per sub-discriminator.
        features: per sub-discriminator, the activations of each layer (for feature matching).
    """

    logits: list[torch.Tensor]
    features: list[list[torch.Tensor]]


def _conv(norm: str, *args, **kwargs) -> nn.Module:
    """A normalised Conv2d (tuple kernel) or Conv1d (int kernel)."""
    conv = (nn.Conv2d if isinstance(args[2], tuple) else nn.Conv1d)(*args, **kwargs)
    return weight_norm(conv) if norm == "weight" else spectral_norm(conv)


class PeriodDiscriminator(nn.Module):
    """Looks at every `period`-th sample: [B, 1, T] is folded to [B, 1, T / period, period] and convolved in time.

    Args:
        period: folding period in samples.
        channels: output channels of the strided layers (stride 3 in time each).
        norm: "weight" or "spectral".
    """

    def __init__(self, period: int, channels: tuple[int, ...], norm: str = "weight"):
        super().__init__()
        self.period = period
        layers, c_in = [], 1
        for c_out in channels:
            layers.append(_conv(norm, c_in, c_out, (5, 1), (3, 1), padding=(2, 0)))
            c_in = c_out
        layers.append(_conv(norm, c_in, c_in, (5, 1), 1, padding=(2, 0)))
        self.layers = nn.ModuleList(layers)
        self.post = _conv(norm, c_in, 1, (3, 1), 1, padding=(1, 0))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = audio.shape
        if t % self.period:
            pad = self.period - t % self.period
            audio = F.pad(audio, (0, pad), mode="reflect" if pad < t else "constant")
            t += pad
        x = audio.view(b, c, t // self.period, self.period)
        return _run_stack(self.layers, self.post, x)


class ResolutionDiscriminator(nn.Module):
    """Dilated 1-D convolutions over time of one log-magnitude STFT, the frequency bins as input channels.

    A 2-D (UnivNet/Vocos style) version costs 10-50x more on the CPU for the same input; this one sees the
    whole spectrum of each frame at once and about 30 frames of context.

    Args:
        n_fft: FFT and window size.
        hop: STFT hop.
        channels: channels of every layer.
        norm: "weight" or "spectral".
    """

    def __init__(self, n_fft: int, hop: int, channels: int = 64, norm: str = "weight"):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        c, bins = channels, n_fft // 2 + 1
        self.layers = nn.ModuleList(
            [_conv(norm, bins, c, 3, padding=1)] + [_conv(norm, c, c, 3, padding=d, dilation=d) for d in (2, 4, 8)]
        )
        self.post = _conv(norm, c, 1, 3, padding=1)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = torch.stft(audio.float().flatten(0, 1), self.n_fft, self.hop, window=self.window, return_complex=True)
        x = torch.log1p(spec.abs())  # [B, bins, frames]
        return _run_stack(self.layers, self.post, x)


def _run_stack(layers: nn.ModuleList, post: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Leaky-ReLU conv stack then the output conv: (logits flattened per example, every layer's output)."""
    features = []
    for layer in layers:
        x = F.leaky_relu(layer(x), LEAK)
        features.append(x)
    x = post(x)
    features.append(x)
    return x.flatten(1), features


class Discriminators(nn.Module):
    """All sub-discriminators: one period discriminator per period, one STFT discriminator per resolution.

    The sizes come from `training.config.DiscConfig`, whose defaults are the source of truth.

    Args:
        periods: periods of the multi-period discriminator.
        mpd_channels: channels of each period discriminator.
        resolutions: (n_fft, hop) of each STFT discriminator.
        mrd_channels: channels of each STFT discriminator.
        norm: "weight" or "spectral".
    Input [B, 1, T]; output `DiscriminatorOutput`.
    """

    def __init__(self, periods, mpd_channels, resolutions, mrd_channels: int, norm: str = "weight"):
        super().__init__()
        if not periods and not resolutions:
            raise ValueError("at least one period or resolution is needed")
        self.discriminators = nn.ModuleList(
            [PeriodDiscriminator(p, mpd_channels, norm) for p in periods]
            + [ResolutionDiscriminator(n, h, mrd_channels, norm) for n, h in resolutions]
        )

    def forward(self, audio: torch.Tensor) -> DiscriminatorOutput:
        logits, features = [], []
        for disc in self.discriminators:
            x, f = disc(audio)
            logits.append(x)
            features.append(f)
        return DiscriminatorOutput(logits, features)
