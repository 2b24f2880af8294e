"""The synthesis's two arithmetic forms: `TraceableSpectra` (real tensors, what ONNX export traces) gives the
samples of `FFTSpectra` (complex tensors, what PyTorch runs) through the same steps; and `FFTSpectra`'s
overlap-add of a step's few frames gives fold's sums exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codec.synthesis import FFTSpectra, ISTFTSynthesis, TraceableSpectra

N_FFT, HOP, PER_STEP = 320, 80, 4


def _inputs(synthesis: ISTFTSynthesis, steps: int = 3, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, steps, synthesis.in_dim, generator=generator)
    log_mag, phase = synthesis.split(x)
    tail = 0.1 * torch.randn(batch, synthesis.delay, generator=generator)
    return synthesis.magnitudes(log_mag - 2.0), 0.3 * phase, tail


@pytest.mark.parametrize(
    "variant",
    [dict(phase="absolute"), dict(phase="propagated"), dict(phase="propagated", rephase_iters=2, carry_share=0.3)],
)
def test_the_traceable_form_gives_the_fft_forms_samples(variant):
    synthesis = ISTFTSynthesis(N_FFT, HOP, PER_STEP, **variant)
    mag, phase, tail = _inputs(synthesis)
    want = synthesis.samples(mag, phase, tail)
    got = synthesis.samples(mag, phase, tail, TraceableSpectra(synthesis))
    assert got.shape == want.shape == (2, 3 * PER_STEP * HOP + synthesis.delay)
    assert want.abs().max() > 0.1  # not silence
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    if not synthesis.rephase_iters:  # the first samples complete the tail (re-phasing hears it, so not there)
        silent = synthesis.samples(mag, phase, None)
        torch.testing.assert_close(want[:, : synthesis.delay] - silent[:, : synthesis.delay], tail, atol=1e-6, rtol=0)


def test_the_played_spectra_keep_the_magnitudes_and_need_an_offline_call():
    synthesis = ISTFTSynthesis(N_FFT, HOP, PER_STEP, "propagated", rephase_iters=1, carry_share=0.3)
    mag, deviation, _ = _inputs(synthesis)
    played = synthesis.played_spectra(mag, deviation)
    assert played.shape == mag.shape and played.is_complex()
    torch.testing.assert_close(played.abs(), mag, atol=1e-6, rtol=1e-5)
    with synthesis.streaming(2), pytest.raises(RuntimeError, match="offline only"):
        synthesis.played_spectra(mag, deviation)


@pytest.mark.parametrize("count", [1, 4, 8, 9])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_the_overlap_add_sums_as_fold_does_bit_for_bit(count, batch):
    """Up to 8 frames are summed row by row, more by fold: the same sums in the same order, whatever the batch
    (streaming equals offline, and a batched step equals its streams alone)."""
    synthesis = ISTFTSynthesis(N_FFT, HOP, PER_STEP)
    generator = torch.Generator().manual_seed(count)
    spec = torch.randn(batch, count, synthesis.bins, dtype=torch.complex64, generator=generator)
    spec = spec * torch.exp(4 * torch.randn(batch, count, 1, generator=generator))  # levels far apart
    spec.requires_grad_(True)
    weight = torch.randn(batch, (count - 1) * HOP + N_FFT, generator=generator)
    frames = torch.fft.irfft(spec, n=N_FFT, dim=-1) * synthesis.window
    folded = F.fold(frames.transpose(1, 2), output_size=(1, weight.shape[1]), kernel_size=(1, N_FFT), stride=(1, HOP))
    (want_grad,) = torch.autograd.grad((folded.reshape(weight.shape) * weight).sum(), spec)
    got = FFTSpectra(synthesis).overlap_add(spec, None)
    (got_grad,) = torch.autograd.grad((got * weight).sum(), spec)
    assert torch.equal(got, folded.reshape(weight.shape))
    # Training trains through it: the same gradient, to rounding (on some CPUs the backward FFT's last bits
    # depend on the gradient's memory layout, which differs between the two).
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6 * float(want_grad.abs().max()))
