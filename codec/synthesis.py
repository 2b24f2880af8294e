"""The decoder's output stage: the causal inverse STFT (`ISTFTSynthesis`), its phase propagation and re-phasing."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codec.features import centre_advance, dft_matrix, hann_window, hops_per_window, matrix_stft
from codec.modules import constant, vectorised
from codec.streaming import StreamingModule


@constant
def _bin_centres(bins: int, n_fft: int, device: torch.device) -> Tensor:
    """`[bins]` float64: each bin's centre frequency in cycles per sample."""
    return torch.arange(bins, dtype=torch.float64, device=device) / n_fft


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
    """Sub-frames `[B, N, bins]` -> `unit_phase(heard)` and the phase of its last sub-frame `[B, 1, bins]` (float64),
    the only one the running phase needs (this runs once per step of the played re-phasing)."""
    unit = unit_phase(heard)
    return unit, vectorised(torch.angle, unit[:, -1:]).double()


def runs_compiled(*tensors: Tensor) -> bool:
    """Whether the re-phasing's steps run compiled (`codec.rephasing`) on these tensors: inference on the CPU
    (float32, no gradient, not tracing) where numba is installed. Elsewhere PyTorch's steps run."""
    return (
        not torch.jit.is_tracing()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)
        and _compiled_steps() is not None
    )


@functools.cache
def _compiled_steps():
    """`codec.rephasing`, imported on first use (numba adds about 80 MB to a process), or None without numba:
    every installation has it (pyproject.toml), a bare GPU training machine may not (training/bundle_run.py)."""
    try:
        from codec import rephasing
    except ImportError:
        return None
    return rephasing


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
        # In place, one float64 tensor as large as the spectrum: a minute of audio makes it 15 MB, and each new
        # one cost as much in fresh pages as in arithmetic. f0 carries no gradient.
        deviation = (centre / f0).round_().clamp_min_(1).mul_(f0)  # the nearest harmonic, cycles/sample
        deviation.sub_(centre).mul_(2 * math.pi * self.hop)
        return deviation.masked_fill_(~voiced[..., None], 0.0)

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
        out = self.samples(mag, phase, state.tail if state is not None else None)
        if state is None:
            return out[:, None, self.delay :]  # its first `delay` samples lie before the signal's start
        ready = steps * self.frames_per_step * self.hop
        state.tail = out[:, ready:]
        drop = min(int(state.skip), ready)
        state.skip = state.skip - drop
        return out[:, None, drop:ready]

    def samples(self, mag: Tensor, phase: Tensor, tail: Tensor | None, spectra: Spectra | None = None) -> Tensor:
        """Magnitudes and phase parameters `[B, N, bins]` and the pending sums `tail` `[B, delay]` (None: silence)
        -> `[B, N * hop + delay]` samples, the first `delay` of them completing `tail`, the last `delay` the
        next tail. Streaming, the running phase moves on. `spectra` computes with the sub-frames: `FFTSpectra`
        unless given (ONNX export gives `TraceableSpectra`); at inference on the CPU the re-phasing's steps
        run compiled instead (`runs_compiled`)."""
        if self.rephase_iters and spectra is None and runs_compiled(mag, phase):
            return self._played_compiled(mag, phase, tail)
        spectra = FFTSpectra(self) if spectra is None else spectra
        if self.rephase_iters:
            return self._played(spectra, mag, phase, tail)[1]
        played_phase = self._propagate(phase) if self.phase == "propagated" else phase
        return spectra.overlap_add(spectra.polar(mag, played_phase), tail)

    def played_spectra(self, mag: Tensor, deviation: Tensor) -> Tensor:
        """Offline: magnitudes and advance deviations `[B, N, bins]` -> the complex sub-frames the re-phasing
        plays (`rephase_iters`), `[B, N, bins]`; for analysis (`eval.oracle`)."""
        if self._streaming_state is not None:
            raise RuntimeError("played_spectra() is offline only: it would move the stream's running phase")
        steps = self._played(FFTSpectra(self), mag, deviation, None)[0]
        return torch.cat(steps, dim=1) if steps else mag.new_zeros(mag.shape, dtype=torch.complex64)

    def _played(self, spectra: Spectra, mag: Tensor, deviation: Tensor, tail: Tensor | None) -> tuple[list, Tensor]:
        """Magnitudes and advance deviations `[B, N, bins]` -> the sub-frames the re-phasing plays, one entry per
        step in `spectra`'s form, and the samples `samples` returns, computed one step after another.

        Each step's sub-frames start from the running phase plus the decoder's advances and are re-phased
        from what they sound like over the samples already played; the running phase then moves part of the
        way to the phase of the last sub-frame played (`carry_share`). Offline and streaming run the same
        steps in the same order, so from the same input they give the same samples, bit for bit. Tracing
        unrolls the loop over the steps: a traced graph takes the number of steps it was traced with."""
        batch, n, hop = mag.shape[0], self.frames_per_step, self.hop
        state = self._streaming_state
        phase = self._running_phase(mag)[:, None]  # [B, 1, bins] through the steps
        played = tail if tail is not None else mag.new_zeros(batch, self.delay)
        advance = deviation.double() + self._centre_advance(deviation.device)
        advance = advance.reshape(batch, -1, n, self.bins).cumsum(2)  # each step's advances from its start
        out, played_spectra = [], []
        for step_advance, step_mag in zip(advance.unbind(1), mag.reshape(batch, -1, n, self.bins).unbind(1)):
            own = torch.remainder(phase + step_advance, 2 * math.pi)
            pending = played  # the last `delay` samples played, still waiting for this step's sub-frames
            played = spectra.overlap_add(spectra.polar(step_mag, own.to(mag.dtype)), pending)
            for _ in range(self.rephase_iters):
                spectrum, last_phase = spectra.rephased(played, step_mag)
                played = spectra.overlap_add(spectrum, pending)
            played_spectra.append(spectrum)
            out.append(played[:, : n * hop])
            played = played[:, n * hop :]
            phase = carried_phase(own[:, -1:], last_phase, self.carry_share)
        if state is not None:
            state.phase = phase[:, 0].detach()
        return played_spectra, torch.cat([*out, played], dim=-1)

    def _played_compiled(self, mag: Tensor, deviation: Tensor, tail: Tensor | None) -> Tensor:
        """`_played`'s samples through `codec.rephasing`'s compiled steps (CPU inference)."""
        tail = tail if tail is not None else mag.new_zeros(mag.shape[0], self.delay)
        samples, phase = _compiled_steps().played(
            mag,
            deviation,
            self._centre_advance(mag.device),
            self._running_phase(mag),
            tail,
            self.window,
            self.analysis_window,
            self.hop,
            self.frames_per_step,
            self.rephase_iters,
            self.carry_share,
        )
        if self._streaming_state is not None:
            self._streaming_state.phase = phase
        return samples

    def _running_phase(self, like: Tensor) -> Tensor:
        """`[B, bins]` float64: the phase the next step starts from (0 at a stream's start and offline)."""
        state = self._streaming_state
        return state.phase if state is not None else like.new_zeros(like.shape[0], self.bins, dtype=torch.float64)

    def flush(self) -> Tensor:
        """End of a stream: the last `delay` samples (`[B, 1, delay]`, or none before any input)."""
        state = self._streaming_state
        if state is None:
            raise RuntimeError("flush() is only meaningful while streaming")
        tail = state.tail[:, None, int(state.skip) :]
        state.tail, state.phase = torch.zeros_like(state.tail), torch.zeros_like(state.phase)
        state.skip = torch.full_like(state.skip, self.delay)
        return tail


class Spectra(Protocol):
    """How the synthesis computes with sub-frame spectra `[B, N, bins]`; the steps around it are
    `ISTFTSynthesis`'s, shared by every form."""

    def polar(self, mag: Tensor, phase: Tensor) -> Any:
        """Magnitudes and phases -> sub-frames in this form."""

    def overlap_add(self, spec: Any, tail: Tensor | None) -> Tensor:
        """Sub-frames and the pending sums `tail` `[B, delay]` -> `[B, N * hop + delay]` samples, the first
        `delay` of them completing `tail`."""

    def rephased(self, played: Tensor, mag: Tensor) -> tuple[Any, Tensor]:
        """Samples played `[B, N * hop + delay]` and magnitudes `[B, N, bins]` -> the sub-frames with the phases
        the samples have there and the magnitudes `mag`, and the last sub-frame's phase `[B, 1, bins]` float64."""


class FFTSpectra:
    """Sub-frames as complex tensors through PyTorch's FFTs: what `ISTFTSynthesis` runs."""

    def __init__(self, synthesis: ISTFTSynthesis):
        self.synthesis = synthesis

    polar = staticmethod(torch.polar)

    def overlap_add(self, spec: Tensor, tail: Tensor | None) -> Tensor:
        s = self.synthesis
        frames = torch.fft.irfft(spec, n=s.n_fft, dim=-1) * s.window  # [B, N, n_fft]
        batch, count = frames.shape[:2]
        total = (count - 1) * s.hop + s.n_fft
        if count > 8:
            out = F.fold(
                frames.transpose(1, 2), output_size=(1, total), kernel_size=(1, s.n_fft), stride=(1, s.hop)
            ).reshape(batch, total)
        else:  # a step's few frames: fold's sums in fold's order (the last frame first), for less than fold
            # Row k of a zero table holds frame count-1-k at its place, and the rows are summed in order.
            rows = frames.new_zeros(batch, count, total)
            placed = rows.as_strided((batch, count, s.n_fft), (count * total, total - s.hop, 1), (count - 1) * s.hop)
            placed.copy_(frames.flip(1))
            out = rows.sum(1)
        if tail is not None:
            out[:, : s.delay] += tail
        return out

    def rephased(self, played: Tensor, mag: Tensor) -> tuple[Tensor, Tensor]:
        s = self.synthesis
        heard = torch.fft.rfft(played.unfold(-1, s.n_fft, s.hop) * s.analysis_window, dim=-1)
        unit, last_phase = _unit_and_last_phase(heard)
        return unit * mag, last_phase


class TraceableSpectra(nn.Module):
    """`FFTSpectra` in real tensors, for ONNX export (`codec.onnx_export`), which has neither complex tensors
    nor an FFT: sub-frames as (real, imaginary) pairs, the real DFT and its inverse as products with constant
    matrices, the overlap-add as a sum of shifted frames. The same values to the last bits or so: other
    kernels sum in another order. The pending sums `tail` are always given (graph state)."""

    def __init__(self, synthesis: ISTFTSynthesis):
        super().__init__()
        self.hop, self.delay = synthesis.hop, synthesis.delay
        self.blocks = hops_per_window(synthesis.n_fft, synthesis.hop)
        cos, sin = _inverse_dft_matrices(synthesis.n_fft)
        self.register_buffer("cos_basis", cos.float(), persistent=False)
        self.register_buffer("sin_basis", sin.float(), persistent=False)
        self.register_buffer("window", synthesis.window, persistent=False)
        if synthesis.rephase_iters:
            self.register_buffer("analysis", dft_matrix(synthesis.analysis_window).float(), persistent=False)

    @staticmethod
    def polar(mag: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
        return mag * torch.cos(phase), mag * torch.sin(phase)

    def overlap_add(self, spec: tuple[Tensor, Tensor], tail: Tensor) -> Tensor:
        re, im = spec
        frames = (re @ self.cos_basis + im @ self.sin_basis) * self.window
        frames = frames.reshape(frames.shape[0], frames.shape[1], self.blocks, self.hop)
        last = self.blocks - 1  # sub-frame k's block i lands on output block k + i
        out = sum(F.pad(frames[:, :, i], (0, 0, i, last - i)) for i in range(self.blocks))  # [B, N + last, hop]
        out = out.reshape(out.shape[0], -1)
        return torch.cat([out[:, : self.delay] + tail, out[:, self.delay :]], dim=-1)

    def rephased(self, played: Tensor, mag: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        re, im = matrix_stft(played, self.analysis, self.hop)
        re = re + 1e-30  # as in `unit_phase`: a silent bin takes phase 0
        scale = mag / torch.sqrt(re * re + im * im).clamp_min(1e-30)
        return (re * scale, im * scale), torch.atan2(im[:, -1:], re[:, -1:]).double()


def _inverse_dft_matrices(n_fft: int) -> tuple[Tensor, Tensor]:
    """`irfft(spec, n_fft)` of a half spectrum as two float64 matrices `[bins, n_fft]`, for its real and its
    imaginary parts (the imaginary parts of DC and Nyquist do not count, as in irfft)."""
    bins = n_fft // 2 + 1
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(bins, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(k, n) / n_fft
    weight = torch.full((bins, 1), 2.0, dtype=torch.float64)
    weight[0] = weight[-1] = 1.0
    cos, sin = torch.cos(angle) * weight / n_fft, -torch.sin(angle) * weight / n_fft
    sin[0] = sin[-1] = 0.0
    return cos, sin
