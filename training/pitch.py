"""Pitch targets for the decoder's pitch head: YIN (de Cheveigne and Kawahara, 2002) on a batch of crops.

Run on the training batch itself, on whatever device it lives, so that no corpus needs a pitch cache and
the GPU bundle carries nothing more. One estimate per synthesis sub-frame, centred on the samples that
sub-frame covers (`codec.synthesis.ISTFTSynthesis`); the estimate may look a little past the sub-frame's
end, which is fine for a training target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

F0_MIN, F0_MAX = 60.0, 500.0
THRESHOLD = 0.15  # YIN's absolute threshold on the cumulative mean normalised difference
VOICING = 0.3  # a frame is voiced if the chosen lag's normalised difference is below this
SILENCE_DB = -45.0  # frames this far below the crop's loudest are unvoiced whatever YIN finds


@torch.no_grad()
def yin_f0(
    audio: Tensor, sample_rate: int, n_fft: int, hop: int, window: int | None = None, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """`[B, T]` -> f0 in Hz `[B, N]` and voicing `[B, N]` (bool), N = T // hop sub-frames.

    Sub-frame n covers samples [(n+1)*hop - n_fft, (n+1)*hop); its estimate uses `window` samples
    (default 2.5 periods of F0_MIN) plus the longest lag, centred there, or with `causal` ending at the
    sub-frame's last sample (what an encoder could send without look-ahead). Unvoiced frames have f0 = 0.
    """
    audio = audio.float()
    batch, length = audio.shape
    frames = length // hop
    max_lag = int(math.ceil(sample_rate / F0_MIN))
    min_lag = int(sample_rate / F0_MAX)
    window = window or int(2.5 * sample_rate / F0_MIN) - max_lag  # integration window W
    span = window + max_lag
    centres = (torch.arange(frames, device=audio.device) + 1) * hop - (span - span // 2 if causal else n_fft // 2)
    starts = centres - span // 2
    pad_left = max(0, -int(starts[0]))
    pad_right = max(0, int(starts[-1]) + span - length)
    padded = F.pad(audio, (pad_left, pad_right))
    index = (starts + pad_left)[:, None] + torch.arange(span, device=audio.device)  # [N, span]
    seg = padded[:, index]  # [B, N, span]

    # d(tau) = sum_{j<W} (x_j - x_{j+tau})^2 = e(0) + e(tau) - 2 r(tau), r by FFT, e by cumulative sums.
    n = 1 << (2 * span - 1).bit_length()
    spectrum = torch.fft.rfft(seg, n=n)
    head = torch.fft.rfft(seg[..., :window], n=n)
    r = torch.fft.irfft(spectrum * head.conj(), n=n)[..., : max_lag + 1]  # sum_j x_j x_{j+tau}
    energy = F.pad(torch.cumsum(seg**2, dim=-1), (1, 0))
    lags = torch.arange(max_lag + 1, device=audio.device)
    e_tau = energy[..., lags + window] - energy[..., lags]
    d = (e_tau[..., :1] + e_tau - 2 * r).clamp_min(0)
    cumulative = torch.cumsum(d[..., 1:], dim=-1)
    cmnd = torch.ones_like(d)
    cmnd[..., 1:] = d[..., 1:] * lags[1:] / cumulative.clamp_min(1e-9)

    # The first dip below THRESHOLD (from min_lag on), followed down to its local minimum; else the
    # global minimum.
    search = cmnd[..., min_lag:max_lag]
    below = search < THRESHOLD
    first = below.float().argmax(-1)  # 0 where there is no dip: the global minimum is taken then
    rising = F.pad(search[..., 1:] >= search[..., :-1], (0, 1), value=True)
    positions = torch.arange(search.shape[-1], device=audio.device)
    at_minimum = rising & (positions >= first[..., None])
    tau = torch.where(below.any(-1), at_minimum.float().argmax(-1), search.argmin(-1))
    # Parabolic interpolation around the chosen lag.
    left = search.gather(-1, (tau - 1).clamp_min(0)[..., None])[..., 0]
    mid = search.gather(-1, tau[..., None])[..., 0]
    right = search.gather(-1, (tau + 1).clamp_max(search.shape[-1] - 1)[..., None])[..., 0]
    curvature = left - 2 * mid + right
    shift = torch.where(curvature > 1e-9, 0.5 * (left - right) / curvature.clamp_min(1e-9), torch.zeros_like(mid))
    period = (tau + min_lag).float() + shift.clamp(-1, 1)

    level = 10 * torch.log10(e_tau[..., 0] / window + 1e-10)
    loud = level > level.amax(-1, keepdim=True) + SILENCE_DB
    voiced = (mid < VOICING) & loud
    f0 = torch.where(voiced, sample_rate / period, torch.zeros_like(period))
    return f0, voiced


def pitch_loss(
    f0_logits: Tensor, voicing_logit: Tensor, bin_log_f0: Tensor, f0: Tensor, voiced: Tensor, blur_bins: float = 1.0
) -> dict[str, Tensor]:
    """The pitch head against the track: cross-entropy of its f0 distribution against a Gaussian (`blur_bins`
    wide) around the track's f0, on voiced sub-frames only; binary cross-entropy of voicing."""
    spacing = bin_log_f0[1] - bin_log_f0[0]
    distance = (f0.clamp_min(1.0).log()[..., None] - bin_log_f0) / (spacing * blur_bins)
    target = torch.softmax(-0.5 * distance**2, dim=-1)
    cross_entropy = -(target * torch.log_softmax(f0_logits.float(), dim=-1)).sum(-1)
    voiced_f = voiced.float()
    return {
        "pitch/f0": torch.where(voiced, cross_entropy, 0.0).sum() / voiced_f.sum().clamp_min(1.0),
        "pitch/voicing": F.binary_cross_entropy_with_logits(voicing_logit.float(), voiced_f),
    }
