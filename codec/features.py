"""The causal STFT and its window, the bin-centre phase turns, and the encoder's spectral features (`STFTFeatures`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from codec.modules import HistoryState, constant, vectorised
from codec.streaming import StreamingModule


FEATURE_CHUNK = 64
"""Steps whose features `STFTFeatures` computes at once. Its float64 temporaries for 64 steps at the bundled
model's settings (256 sub-frames of 161 bins) are 330 kB each and stay in cache; a minute of audio at once
took twice as long (250 ms against 130 on one thread)."""


def hann_window(n_fft: int) -> Tensor:
    return torch.hann_window(n_fft, periodic=True)


@constant
def centre_advance(n_fft: int, hop: int, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """`[n_fft // 2 + 1]`: how far each bin's centre frequency turns its phase in one hop (radians)."""
    return 2 * math.pi * hop / n_fft * torch.arange(n_fft // 2 + 1, dtype=dtype, device=device)


@constant
def centre_turn(n_fft: int, hop: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The cosine and sine of `centre_advance`."""
    centre = centre_advance(n_fft, hop, device, dtype)
    return torch.cos(centre), torch.sin(centre)


def causal_stft(x: Tensor, window: Tensor, hop: int, padded: bool = True) -> Tensor:
    """`[B, T]` -> complex `[B, N, bins]`: frame k is the `n_fft` samples ending at sample (k+1)*hop.

    `padded` prepends the `n_fft - hop` zeros that the first frames see before the signal starts (pass
    False when `x` already begins with that history)."""
    n_fft = window.shape[-1]
    if padded:
        x = F.pad(x, (n_fft - hop, 0))
    return torch.fft.rfft(x.unfold(-1, n_fft, hop) * window, dim=-1)


class STFTFeatures(StreamingModule):
    """Causal STFT analysis: waveform -> per-frame spectral features.

    Sub-frames of `n_fft` samples every `hop` samples; sub-frame k ends at sample (k+1)*hop, so it only sees
    the past. `frames_per_step` consecutive sub-frames are stacked into one output step.

    Args:
        n_fft: analysis window (samples).
        hop: sub-frame hop (samples).
        frames_per_step: sub-frames stacked per output step (the codec frame is `hop * frames_per_step`).
        compress: power-law exponent for the compressed complex spectrum features.
        advances: also give each sub-frame's phase advance over the sub-frame before, per bin, as the
            compressed complex product X_k conj(X_{k-1}) turned back by the bin centre's advance: a steady
            partial's exact frequency, which the other features hold only across sub-frames (the decoder has
            to reproduce these advances, `ISTFTSynthesis`). Appended after the other features of a step, so
            a model without them grows into one with them by zero input weights (`training.train.load_grown`).
    Input `[B, 1, T]` with T a multiple of `hop * frames_per_step`; output `[B, T / (hop*frames_per_step),
    out_dim]`: per sub-frame the log magnitude and the compressed real and imaginary parts
    (`frames_per_step * 3 * (n_fft // 2 + 1)`), then with `advances` the compressed advances' real and
    imaginary parts (`frames_per_step * 2 * (n_fft // 2 + 1)` more).
    """

    def __init__(self, n_fft: int, hop: int, frames_per_step: int, compress: float = 0.3, advances: bool = False):
        super().__init__()
        self.n_fft, self.hop, self.frames_per_step, self.compress = n_fft, hop, frames_per_step, compress
        self.advances = advances
        bins = n_fft // 2 + 1
        # Samples of the past each call needs: the window's overlap, and one sub-frame more for the advances.
        self.context = n_fft - hop + (hop if advances else 0)
        self.register_buffer("window", hann_window(n_fft), persistent=False)
        self.out_dim = frames_per_step * (5 if advances else 3) * bins

    def _init_streaming_state(self, batch_size: int) -> HistoryState:
        return HistoryState(self.window.new_zeros(batch_size, self.context))

    def forward(self, wav: Tensor) -> Tensor:
        x = wav[:, 0]
        state = self._streaming_state
        if state is None:
            x = F.pad(x, (self.context, 0))  # silence before the signal starts
        else:
            x = torch.cat([state.history, x], dim=-1)
            state.history = x[:, x.shape[-1] - self.context :]
        # A step's features depend on its own samples (and the context before them) alone, so on the CPU a
        # long input goes through in pieces of FEATURE_CHUNK steps: the same values, temporaries in cache.
        step = self.hop * self.frames_per_step
        n_steps = (x.shape[-1] - self.context) // step
        chunk = FEATURE_CHUNK if x.device.type == "cpu" else max(n_steps, 1)
        pieces = [
            self._features(x[:, start * step : min(n_steps, start + chunk) * step + self.context])
            for start in range(0, max(n_steps, 1), chunk)
        ]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)).to(wav.dtype)

    def _features(self, x: Tensor) -> Tensor:
        """Samples `[B, context + N * hop * frames_per_step]` -> the features of the N steps, in float32."""
        # In float64, then rounded to float32: the last bits of the FFT, pow and log depend on how many frames
        # go in at once (vectorised bodies against scalar tails), and in float32 those differences between a
        # streamed and an offline pass would reach the codes.
        spec = causal_stft(x.double(), self.window.double(), self.hop, padded=False)  # [B, N (+ 1), bins]
        re, im = spec.real, spec.imag
        # Correctly rounded products, sum and root: an element's magnitude does not depend on where it sits
        # (complex `abs` has to be `vectorised` for that), it costs less, and it is the ONNX export's formula.
        return self.from_spectrum(re, im, torch.sqrt(re * re + im * im))

    def from_spectrum(self, re: Tensor, im: Tensor, mag: Tensor) -> Tensor:
        """The STFT's real and imaginary parts and magnitude `[B, N, bins]` -> the features, N / frames_per_step
        steps (also what the ONNX export's matrix DFT feeds, `codec.onnx_export`). With `advances` the first
        sub-frame is the one before the first step's, there only for its advance: `[B, N + 1, bins]`.

        Each feature is rounded to float32 before the features are joined: the same values as joining them in
        float64 and rounding after, with half the bytes to copy (a third less time for these features)."""
        if self.advances:
            # X_k conj(X_{k-1}), turned back by the bin centre's advance 2 pi hop b / n_fft.
            cos, sin = centre_turn(self.n_fft, self.hop, re.device, re.dtype)
            prod_re = re[:, 1:] * re[:, :-1] + im[:, 1:] * im[:, :-1]
            prod_im = im[:, 1:] * re[:, :-1] - re[:, 1:] * im[:, :-1]
            adv_re, adv_im = prod_re * cos + prod_im * sin, prod_im * cos - prod_re * sin
            # |X_k X_{k-1}|^(compress/2): on the scale of the compressed spectrum below.
            adv_scale = vectorised(lambda m: m.pow(self.compress / 2 - 1.0), mag[:, 1:] * mag[:, :-1] + 1e-14)
            advances = self._steps(torch.cat([(part * adv_scale).float() for part in (adv_re, adv_im)], dim=-1))
            re, im, mag = re[:, 1:], im[:, 1:], mag[:, 1:]
        scale = vectorised(lambda m: m.pow(self.compress - 1.0), mag + 1e-7)
        parts = [torch.log(mag + 1e-5), re * scale, im * scale]
        feats = self._steps(torch.cat([part.float() for part in parts], dim=-1))
        return torch.cat([feats, advances], dim=-1) if self.advances else feats

    def _steps(self, per_sub_frame: Tensor) -> Tensor:
        """`[B, N, width]` -> `[B, N / frames_per_step, frames_per_step * width]`."""
        batch, n_sub, width = per_sub_frame.shape
        return per_sub_frame.reshape(batch, n_sub // self.frames_per_step, self.frames_per_step * width)


def hops_per_window(n_fft: int, hop: int) -> int:
    """`n_fft / hop`: the matrix forms of the STFT and its inverse (ONNX export) cut signals into hop-long blocks."""
    if n_fft % hop:
        raise ValueError(f"ONNX export needs n_fft ({n_fft}) to be a multiple of sub_hop ({hop})")
    return n_fft // hop


def dft_matrix(window: Tensor) -> Tensor:
    """The windowed real DFT of `causal_stft` as one float64 matrix `[n_fft, 2 * bins]` (cosines, then -sines)."""
    n_fft = window.shape[-1]
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(n, k) / n_fft
    return torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1) * window.double()[:, None]


def matrix_stft(x: Tensor, basis: Tensor, hop: int) -> tuple[Tensor, Tensor]:
    """`causal_stft(x, window, hop, padded=False)` as its real and imaginary parts `[B, N, bins]`, computed in
    `basis`'s dtype as slices of `x` `[B, T]` (T a multiple of `hop`) times `basis = dft_matrix(window)`: the
    form ONNX export traces, since it has neither complex tensors nor an FFT."""
    blocks = x.to(basis.dtype).reshape(x.shape[0], -1, hop)  # [B, T / hop, hop]
    count = hops_per_window(basis.shape[0], hop)
    last = count - 1
    frames = torch.cat([blocks[:, i : (i - last) or None] for i in range(count)], dim=-1)  # [B, N, n_fft]
    return (frames @ basis).chunk(2, dim=-1)
