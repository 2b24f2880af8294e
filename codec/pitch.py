"""The decoder's pitch head (`PitchHead`): per synthesis sub-frame, an f0 distribution, voicing and trust."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from codec.modules import Linear, constant


@constant
def _offsets(lo: int, hi: int, device: torch.device) -> Tensor:
    return torch.arange(lo, hi, device=device)


class PitchHead(nn.Module):
    """Decoder features `[B, F, dim]` -> per synthesis sub-frame: logits over log-spaced f0 bins `[B, N, bins]`,
    a voicing logit `[B, N]` and, per synthesis bin, how far to trust the harmonic prior (a logit,
    `[B, N, gate_bins]`).

    A classifier, as neural pitch trackers are (CREPE): a distribution over f0 learns faster than a regressed
    value and keeps octave ambiguity out of the average. Trained against a pitch track of the input
    (training.pitch), so the token stream stays pure codes. The trust starts near zero (a grown head leaves
    a trained decoder almost as it was) and is learned from the decoder's own losses.
    """

    def __init__(
        self,
        dim: int,
        frames_per_step: int,
        gate_bins: int,
        f0_min: float = 50.0,
        f0_max: float = 550.0,
        bins: int = 128,
    ):
        super().__init__()
        self.frames_per_step, self.bins = frames_per_step, bins
        self.register_buffer("bin_log_f0", torch.linspace(math.log(f0_min), math.log(f0_max), bins), persistent=False)
        width = bins + 1 + gate_bins
        self.proj = nn.Sequential(nn.LayerNorm(dim), Linear(dim, dim), nn.GELU(), Linear(dim, frames_per_step * width))
        nn.init.zeros_(self.proj[-1].weight)
        nn.init.zeros_(self.proj[-1].bias)
        with torch.no_grad():
            self.proj[-1].bias.view(frames_per_step, width)[:, bins + 1 :] = -4.0  # trust 0.018

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, steps, _ = features.shape
        out = self.proj(features).float().reshape(batch, steps * self.frames_per_step, -1)
        return out[..., : self.bins], out[..., self.bins], out[..., self.bins + 1 :]

    def log_f0(self, logits: Tensor) -> Tensor:
        """Logits `[B, N, bins]` -> log f0 `[B, N]`: the probability-weighted mean of the bins within two of the
        most likely one (finer than a bin, blind to a competing octave)."""
        near = _offsets(-2, 3, logits.device)
        index = (logits.argmax(-1, keepdim=True) + near).clamp(0, self.bins - 1)  # [B, N, 5]
        weights = torch.softmax(logits.gather(-1, index), dim=-1)
        return (weights * self.bin_log_f0[index]).sum(-1)
