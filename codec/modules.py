"""Building blocks of the codec: causal convolution, ConvNeXt block, STFT analysis and iSTFT synthesis.

Every block is causal and keeps one `forward` for offline and streaming use: in streaming mode a block
carries exactly the context an offline run would have seen (the last input samples or frames, or the
overlap-add tail), so chunked and whole-signal processing agree.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codec.streaming import StreamingModule


_PACKED: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, Tensor]] = weakref.WeakKeyDictionary()
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    """`nn.Linear` whose inference on the CPU multiplies by its weight packed once for oneDNN.

    MKL's matrix product (what `F.linear` calls) repacks the weight on every call, which costs more than the
    product itself when a streaming step multiplies a few rows by a weight that is no longer in the cache; the
    packed product reads it once, in the layout its kernel wants. Its rows also agree bit for bit whatever their
    number (one row aside), which batched streaming needs (`codec.batched`). Training (gradients on), other
    devices and dtypes, and tracing (ONNX export) use `F.linear`. The packed copy is made again after the weight
    changes (its version counter moves) and is not part of the module's state."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            not _ONEDNN
            or torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or torch.jit.is_tracing()
        ):
            return F.linear(x, self.weight, self.bias)
        key = (self.weight.data_ptr(), self.weight._version, tuple(self.weight.shape))
        cached = _PACKED.get(self)
        if cached is None or cached[0] != key:
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
            _PACKED[self] = cached
        return torch.ops.mkldnn._linear_pointwise(x, cached[1], self.bias, "none", [], "")


@dataclass
class _HistoryState:
    history: Tensor  # the last inputs the next call needs as left context


class CausalConv1d(StreamingModule):
    """Stride-1 causal 1-D convolution: output t sees inputs t - (kernel-1)*dilation ... t.

    Args:
        in_channels, out_channels, kernel_size, dilation, groups: as in `nn.Conv1d`.
    Input and output are `[B, C, T]`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)
        self.context = (kernel_size - 1) * dilation

    def _init_streaming_state(self, batch_size: int) -> _HistoryState:
        weight = self.conv.weight
        return _HistoryState(weight.new_zeros(batch_size, self.conv.in_channels, self.context))

    def forward(self, x: Tensor) -> Tensor:
        state = self._streaming_state
        if state is None:
            x = F.pad(x, (self.context, 0))
        else:
            x = torch.cat([state.history, x], dim=-1)
            state.history = x[..., x.shape[-1] - self.context :]
        return self.conv(x)


class ConvNeXtBlock(nn.Module):
    """Causal ConvNeXt block on frame-rate features (Vocos style).

    Depthwise causal conv, LayerNorm, pointwise MLP, layer scale, residual.

    Args:
        dim: channels C.
        kernel_size: depthwise kernel, in frames.
        expansion: hidden width of the MLP is `expansion * dim`.
        layer_scale: initial value of the per-channel residual scale.
    Input and output are `[B, T, C]` (channels last, so the pointwise layers are plain matmuls).
    """

    def __init__(self, dim: int, kernel_size: int = 7, expansion: int = 3, layer_scale: float = 0.1):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = Linear(dim, expansion * dim)
        self.pw2 = Linear(expansion * dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x.transpose(1, 2)).transpose(1, 2)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        return x + self.scale * y


def hann_window(n_fft: int) -> Tensor:
    return torch.hann_window(n_fft, periodic=True)


def constant(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A function of hashable arguments whose tensors are computed once (outside inference mode, so that
    training can save them for backward) and shared: constants of the per-frame path, kept out of it."""
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def wrapper(*args):  # noqa: ANN002, ANN202 - the wrapped function's own signature
        with torch.inference_mode(False), torch.no_grad():
            return cached(*args)

    return wrapper


@constant
def centre_advance(n_fft: int, hop: int, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """`[n_fft // 2 + 1]`: how far each bin's centre frequency turns its phase in one hop (radians)."""
    return 2 * math.pi * hop / n_fft * torch.arange(n_fft // 2 + 1, dtype=dtype, device=device)


@constant
def centre_turn(n_fft: int, hop: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The cosine and sine of `centre_advance`."""
    centre = centre_advance(n_fft, hop, device, dtype)
    return torch.cos(centre), torch.sin(centre)


@constant
def _bin_centres(bins: int, n_fft: int, device: torch.device) -> Tensor:
    """`[bins]` float64: each bin's centre frequency in cycles per sample."""
    return torch.arange(bins, dtype=torch.float64, device=device) / n_fft


@constant
def _offsets(lo: int, hi: int, device: torch.device) -> Tensor:
    return torch.arange(lo, hi, device=device)


VECTOR_BLOCK = 64
"""Elements that any of PyTorch's CPU kernels takes through its SIMD code at once (a multiple of every block)."""


def vectorised(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`fn(x)` for an elementwise `fn`, every element through the kernel's SIMD code.

    A CPU kernel runs whole blocks of a tensor through SIMD code and the last few elements through scalar
    code, and for some functions (`sgn`, `angle`, `sigmoid`, `pow`, complex `abs`) the two differ in the last
    bit: an element's result would depend on where in a batch or a chunk it sits. Here the last elements are
    computed again inside a whole block, so a result depends on the element alone (`codec.batched`)."""
    n = x.numel()
    rest = n % VECTOR_BLOCK
    if not rest or x.requires_grad or torch.jit.is_tracing():
        return fn(x)
    if n <= _PADDED_UP_TO:  # small (a streaming step): one call on a padded copy
        return fn(torch.constant_pad_nd(x.reshape(-1), (0, VECTOR_BLOCK - rest)))[:n].view(x.shape)
    out = fn(x.contiguous())  # large: the last elements again, inside a block
    out.view(-1)[-rest:] = fn(torch.constant_pad_nd(x.reshape(-1)[-rest:], (0, VECTOR_BLOCK - rest)))[:rest]
    return out


_PADDED_UP_TO = 1 << 14  # elements


PHASE_GRADIENT_FLOOR = 1e-4
"""Below this magnitude a bin's phase is noise: `unit_phase` differentiates it as if it had this magnitude."""


def carried_phase(own: Tensor, played: Tensor, share: float) -> Tensor:
    """A sub-frame's own phase and the phase it was played at -> the running phase the next step starts from:
    `own` moved `share` of the way to `played`, the short way round (`ISTFTSynthesis`'s `carry_share`)."""
    correction = torch.remainder(played - own + math.pi, 2 * math.pi) - math.pi
    return own + share * correction


def unit_phase(z: Tensor) -> Tensor:
    """z / |z| (phase 0 where z is 0), with a gradient bounded by 1 / PHASE_GRADIENT_FLOOR.

    The exact derivative grows as 1 / |z|: a near-silent bin of a training crop made the whole step's
    gradient infinite, and the trainer skipped one step in ten. The value is exactly `torch.sgn`'s."""
    exact = vectorised(torch.sgn, z + 1e-30)
    if not z.requires_grad:
        return exact
    bounded = z / z.abs().clamp_min(PHASE_GRADIENT_FLOOR)
    return exact.detach() + (bounded - bounded.detach())


def _unit_and_last_phase(heard: Tensor) -> tuple[Tensor, Tensor]:
    """Sub-frames `[B, N, bins]` -> `unit_phase(heard)` and the phase of its last sub-frame `[B, 1, bins]` (float64).

    Without gradients both come from one copy padded to whole SIMD blocks (what `vectorised` gives for each,
    in fewer calls: this runs once per step of the played re-phasing)."""
    if heard.requires_grad:
        unit = unit_phase(heard)
        return unit, vectorised(torch.angle, unit[:, -1:]).double()
    n = heard.numel()
    padded = torch.sgn(torch.constant_pad_nd((heard + 1e-30).reshape(-1), (0, -n % VECTOR_BLOCK)))
    phases = torch.angle(padded)[:n].view(heard.shape)
    return padded[:n].view(heard.shape), phases[:, -1:].double()


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

    def _init_streaming_state(self, batch_size: int) -> _HistoryState:
        return _HistoryState(self.window.new_zeros(batch_size, self.context))

    def forward(self, wav: Tensor) -> Tensor:
        x = wav[:, 0]
        state = self._streaming_state
        if state is None:
            x = F.pad(x, (self.context, 0))  # silence before the signal starts
        else:
            x = torch.cat([state.history, x], dim=-1)
            state.history = x[:, x.shape[-1] - self.context :]
        # In float64, then rounded to float32: the last bits of the FFT, pow and log depend on how many frames
        # go in at once (vectorised bodies against scalar tails), and in float32 those differences between a
        # streamed and an offline pass would reach the codes.
        spec = causal_stft(x.double(), self.window.double(), self.hop, padded=False)  # [B, N (+ 1), bins]
        return self.from_spectrum(spec.real, spec.imag, vectorised(torch.abs, spec)).to(wav.dtype)

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


@dataclass
class _SynthesisState:
    tail: Tensor  # `[B, n_fft - hop]`: overlap-add sums still waiting for later sub-frames
    skip: Tensor  # `[]` int64: leading samples still to drop (they lie before the start of the stream)
    phase: Tensor  # `[B, bins]` float64: the last sub-frame's phase ("propagated" phase only)


class ISTFTSynthesis(StreamingModule):
    """Causal inverse STFT: per-step spectra -> waveform by overlap-add, aligned with `STFTFeatures`.

    Each step carries `frames_per_step` sub-frames of log magnitude and phase. Sub-frame k synthesises the
    samples its analysis frame saw, [(k+1)*hop - n_fft, (k+1)*hop), so the decoder never has to predict the
    waveform ahead of its input. A sample is complete once the `n_fft / hop - 1` later sub-frames that also
    cover it have been added: the output lags the input by `delay = n_fft - hop` samples. Offline, the
    last `delay` samples of a signal lack those sub-frames (a short fade-out); streaming, they wait for the
    next step or `flush()`.

    Args:
        n_fft, hop, frames_per_step: as in `STFTFeatures`.
        phase: "absolute": the input's second half is each sub-frame's phase. "propagated": it is the
            deviation of each bin's phase advance from its centre frequency's (phase-vocoder style); the
            phases are the running sum of the advances, so a steady partial stays coherent from frame to
            frame however the absolute phase drifts.
        rephase_iters: "propagated" phase only. Re-phase each step's sub-frames this many times from what
            they sound like overlapped with the samples already played, magnitudes kept: a causal Griffin-Lim
            per step, which adds no latency and keeps streaming equal to offline. It makes overlapping frames
            agree where the decoder's advances do not. The steps run one after another, each building on what
            the listener heard. 0 plays the decoder's phases as they are.
        carry_share: with re-phasing, the share of its correction to the last sub-frame's phase that the
            running phase carries on to the next step (`carried_phase`; the rest of the phase is the
            decoder's own). Carrying all of it made the output chaotic: a change of 1e-6 in the decoder's
            output changed the audio of a dev file to 16 dB SNR, with half to no less than 81 dB. With the
            shipped weights, 0.5 let the exported ONNX decoder (the same arithmetic in another order) drift to
            13 dB SNR from PyTorch's; 0.3 keeps it above 30 dB and scored no worse (16 dev files at 11
            stages: PESQ-WB 2.171 against 2.137).
    Input `[B, T, frames_per_step * 2 * (n_fft // 2 + 1)]` (log magnitudes, then phases, per sub-frame);
    output `[B, 1, T * hop * frames_per_step]` offline; streaming, the samples completed so far.
    """

    def __init__(
        self,
        n_fft: int,
        hop: int,
        frames_per_step: int,
        phase: str = "absolute",
        rephase_iters: int = 0,
        carry_share: float = 0.0,
    ):
        super().__init__()
        if phase not in ("absolute", "propagated"):
            raise ValueError(f"phase must be 'absolute' or 'propagated', got {phase!r}")
        if rephase_iters and phase != "propagated":
            raise ValueError("rephase_iters needs phase='propagated' (the running phase carries the re-phasing)")
        if not 0.0 <= carry_share <= 1.0:
            raise ValueError(f"carry_share must lie in [0, 1], got {carry_share}")
        self.n_fft, self.hop, self.frames_per_step, self.phase = n_fft, hop, frames_per_step, phase
        self.rephase_iters, self.carry_share = rephase_iters, carry_share
        self.bins = n_fft // 2 + 1
        self.delay = n_fft - hop
        window = hann_window(n_fft)
        # Hann^2 at 4x overlap sums to a constant; divide by it so unit spectra give unit gain.
        overlap_gain = (window**2).sum().item() / hop
        self.register_buffer("window", window / overlap_gain, persistent=False)
        self.register_buffer("analysis_window", window, persistent=False)
        self.in_dim = frames_per_step * 2 * self.bins

    def _init_streaming_state(self, batch_size: int) -> _SynthesisState:
        return _SynthesisState(
            self.window.new_zeros(batch_size, self.delay),
            torch.tensor(self.delay, device=self.window.device),
            self.window.new_zeros(batch_size, self.bins, dtype=torch.float64),
        )

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder output `[B, T, in_dim]` -> log magnitudes and phase parameters, each `[B, N, bins]`."""
        batch, steps, _ = x.shape
        x = x.reshape(batch, steps * self.frames_per_step, 2, self.bins)
        return x[:, :, 0], x[:, :, 1]

    @staticmethod
    def magnitudes(log_mag: Tensor) -> Tensor:
        """Log magnitudes -> linear ones, capped at e^6 so that an untrained decoder cannot overflow."""
        return torch.exp(log_mag.clamp(max=6.0))

    def phase_advances(self, phase: Tensor) -> Tensor:
        """Phase parameters `[B, N, bins]` -> each sub-frame's phase advance over the previous one (radians,
        not wrapped; `[B, N - 1, bins]` for absolute phases, which have no advance into their first frame)."""
        if self.phase == "propagated":
            return phase + self._centre_advance(phase.device).to(phase.dtype)
        return phase.diff(dim=1)

    def harmonic_deviation(self, f0: Tensor) -> Tensor:
        """f0 `[B, N]` in cycles per sample (<= 0: unvoiced) -> `[B, N, bins]`: how far the phase advance of
        each bin's nearest harmonic lies from the bin centre's (zero where unvoiced): the deviation that puts
        a voiced bin on its harmonic's frequency ("propagated" phase)."""
        voiced = f0 > 0
        f0 = torch.where(voiced, f0, torch.ones_like(f0)).double()[..., None]
        centre = _bin_centres(self.bins, self.n_fft, f0.device)  # cycles/sample
        harmonic = torch.round(centre / f0).clamp_min(1) * f0
        deviation = 2 * math.pi * self.hop * (harmonic - centre)
        return torch.where(voiced[..., None], deviation, torch.zeros_like(deviation))

    def _centre_advance(self, device: torch.device) -> Tensor:
        return centre_advance(self.n_fft, self.hop, device)

    def _propagate(self, deviation: Tensor) -> Tensor:
        """Advance deviations `[B, N, bins]` -> phases: a running sum (float64, wrapped to 2 pi) from the
        previous call's last phase when streaming, else from 0. Built here in float64, not kept as a buffer
        that `model.half()` would round."""
        advance = deviation.double() + self._centre_advance(deviation.device)
        state = self._streaming_state
        if state is not None:
            advance = torch.cat([state.phase[:, None], advance], dim=1)
        phase = torch.remainder(torch.cumsum(advance, dim=1), 2 * math.pi)
        if state is not None:
            phase = phase[:, 1:]
            if phase.shape[1]:
                state.phase = phase[:, -1].detach()
        return phase.to(deviation.dtype)

    def forward(self, x: Tensor, steps_present: Tensor | None = None) -> Tensor:
        """`steps_present` `[B]` (offline only): item b has that many real steps, the rest is batch padding,
        silenced here so that it does not overlap into the item's last samples."""
        batch, steps, _ = x.shape
        log_mag, phase = self.split(x)
        mag = self.magnitudes(log_mag)
        if steps_present is not None:
            real = torch.arange(steps, device=x.device) < steps_present.to(x.device)[:, None]  # [B, steps]
            mag = mag * real.repeat_interleave(self.frames_per_step, dim=1)[..., None]
        state = self._streaming_state
        tail = state.tail if state is not None else None
        if self.rephase_iters:
            out = self._played(mag, phase, tail)[1]
        else:
            played_phase = self._propagate(phase) if self.phase == "propagated" else phase
            out = self._overlap_add(torch.polar(mag, played_phase), tail)
        if state is None:
            return out[:, None, self.delay :]  # its first `delay` samples lie before the signal's start
        ready = steps * self.frames_per_step * self.hop
        state.tail = out[:, ready:]
        drop = min(int(state.skip), ready)
        state.skip = state.skip - drop
        return out[:, None, drop:ready]

    def _overlap_add(self, spec: Tensor, tail: Tensor | None = None) -> Tensor:
        """Complex sub-frames `[B, N, bins]` and the pending sums `tail` -> `[B, N * hop + delay]` samples, the
        first `delay` of them completing `tail`."""
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=-1) * self.window  # [B, N, n_fft]
        batch, count = frames.shape[:2]
        total = (count - 1) * self.hop + self.n_fft
        if batch < 4 or count > 8:
            out = F.fold(
                frames.transpose(1, 2), output_size=(1, total), kernel_size=(1, self.n_fft), stride=(1, self.hop)
            ).reshape(batch, total)
        else:  # fold's sums in fold's order (the last frame first), without its cost on many rows of a few frames
            out = frames.new_zeros(batch, total)
            for j in reversed(range(count)):
                out[:, j * self.hop : j * self.hop + self.n_fft] += frames[:, j]
        if tail is not None:
            out[:, : self.delay] += tail
        return out

    def _played(self, mag: Tensor, deviation: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
        """Magnitudes and advance deviations `[B, N, bins]` -> the sub-frames the re-phasing plays `[B, N, bins]`
        and the samples `_overlap_add` would return for them, computed one step after another.

        Each step's sub-frames start from the running phase plus the decoder's advances and are re-phased
        from what they sound like over the samples already played; the running phase then moves part of the
        way to the phase of the last sub-frame played (`carry_share`). Offline and streaming run the same
        steps in the same order, so from the same input they give the same samples, bit for bit."""
        batch, n, hop = mag.shape[0], self.frames_per_step, self.hop
        state = self._streaming_state
        phase = state.phase if state is not None else mag.new_zeros(batch, self.bins, dtype=torch.float64)
        phase = phase[:, None]  # [B, 1, bins] through the steps
        played = tail if tail is not None else mag.new_zeros(batch, self.delay)
        advance = deviation.double() + self._centre_advance(deviation.device)
        advance = advance.reshape(batch, -1, n, self.bins).cumsum(2)  # each step's advances from its start
        out, spectra = [], []
        for step_advance, step_mag in zip(advance.unbind(1), mag.reshape(batch, -1, n, self.bins).unbind(1)):
            own = torch.remainder(phase + step_advance, 2 * math.pi)
            pending = played  # the last `delay` samples played, still waiting for this step's sub-frames
            played = self._overlap_add(torch.polar(step_mag, own.to(mag.dtype)), pending)
            for _ in range(self.rephase_iters):
                heard = torch.fft.rfft(played.unfold(-1, self.n_fft, hop) * self.analysis_window, dim=-1)
                unit, last_phase = _unit_and_last_phase(heard)
                spectrum = unit * step_mag
                played = self._overlap_add(spectrum, pending)
            spectra.append(spectrum)
            out.append(played[:, : n * hop])
            played = played[:, n * hop :]
            phase = carried_phase(own[:, -1:], last_phase, self.carry_share)
        if state is not None:
            state.phase = phase[:, 0].detach()
        played_spectra = torch.cat(spectra, dim=1) if spectra else mag.new_zeros(mag.shape, dtype=torch.complex64)
        return played_spectra, torch.cat([*out, played], dim=-1)

    def flush(self) -> Tensor:
        """End of a stream: the last `delay` samples (`[B, 1, delay]`, or none before any input)."""
        state = self._streaming_state
        if state is None:
            raise RuntimeError("flush() is only meaningful while streaming")
        tail = state.tail[:, None, int(state.skip) :]
        state.tail, state.phase = torch.zeros_like(state.tail), torch.zeros_like(state.phase)
        state.skip = torch.full_like(state.skip, self.delay)
        return tail


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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0
