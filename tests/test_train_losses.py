"""training.losses and training.discriminators: values on known inputs, shapes, gradients, the schedule."""

import math

import pytest
import torch

from tests.conftest import speechlike
from training.discriminators import Discriminators
from codec.features import causal_stft, hann_window
from codec.synthesis import ISTFTSynthesis
from training.losses import (
    ComplexSTFTLoss,
    LinearSTFTLoss,
    MultiScaleMelLoss,
    SpectrumLoss,
    discriminator_loss,
    feature_loss,
    generator_loss,
    slaney_mel_filters,
    wrapped_distance,
)
from training.schedule import lr_factor


def _speech(seconds=0.5, seed=0):
    return torch.from_numpy(speechlike(seconds, seed=seed))[None, None]


@pytest.mark.parametrize(
    "rate, n_fft, n_mels", [(16000, 256, 32), (16000, 2048, 128), (22050, 1024, 80), (8000, 512, 40)]
)
def test_mel_filters_are_librosas_to_the_bit(rate, n_fft, n_mels):
    # Training computes them itself so that a bare GPU machine needs no librosa (training.bundle_run).
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels)
    filters = slaney_mel_filters(rate, n_fft, n_mels)
    assert filters.dtype == expected.dtype and (filters == expected).all()


def test_mel_loss_is_zero_for_identical_audio_and_grows_with_distortion():
    mel = MultiScaleMelLoss(16000, (256, 512), (32, 64))
    x = _speech()
    assert mel(x, x).item() == 0.0
    small = mel(x + 0.001 * torch.randn_like(x), x).item()
    large = mel(x + 0.05 * torch.randn_like(x), x).item()
    assert 0 < small < large


def test_complex_loss_sees_phase_that_the_mel_loss_ignores():
    x = _speech()
    mel = MultiScaleMelLoss(16000, (256, 512), (32, 64))
    cx = ComplexSTFTLoss()
    assert mel(-x, x).item() == pytest.approx(0.0, abs=1e-6)  # same magnitudes
    assert cx(x, x).item() == 0.0
    assert cx(-x, x).item() > 0.01
    y = x.clone().requires_grad_(True)
    cx(torch.zeros_like(x) + y * 0.5, x).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    silent = torch.zeros_like(x, requires_grad=True)  # |X| = 0: the compression must stay differentiable
    cx(silent, x).backward()
    assert torch.isfinite(silent.grad).all()


def test_linear_loss_is_relative_and_sees_frames_that_disagree_in_phase():
    x = _speech(seconds=1.0)
    loss = LinearSTFTLoss()
    assert loss(x, x).item() == 0.0
    assert loss(1.25 * x, x).item() == pytest.approx(0.25, abs=1e-4)  # ||Y - X|| / ||Y||, at every resolution
    assert loss(0.01 * x, 0.01 * x + 0.001 * _speech(seconds=1.0, seed=1)).item() == pytest.approx(
        loss(x, x + 0.1 * _speech(seconds=1.0, seed=1)).item(), rel=1e-3
    )  # scale-free
    # Short frames with the input's magnitudes but random phases: their overlap-add smears every harmonic.
    synthesis = ISTFTSynthesis(320, 80, 4, "absolute")
    spec = causal_stft(x[:, 0], hann_window(320), 80)
    random_phase = torch.rand(spec.shape, generator=torch.Generator().manual_seed(0)) * 2 * math.pi
    scrambled = torch.stack([spec.abs().clamp_min(1e-12).log(), random_phase], dim=2)
    scrambled = synthesis(scrambled.reshape(1, -1, synthesis.in_dim))
    n = x.shape[-1] - synthesis.delay
    assert loss(scrambled[..., :n], x[..., :n]).item() > 0.5
    y = x.clone().requires_grad_(True)
    loss(0.5 * y, x).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def _spectrum_of(x, synthesis, phase_offset=0.0):
    """The decoder output that reproduces `x`'s causal STFT exactly, in `synthesis`'s format."""
    spec = causal_stft(x[:, 0], hann_window(synthesis.n_fft), synthesis.hop)
    phase = spec.angle() + phase_offset
    if synthesis.phase == "propagated":
        first = torch.zeros_like(phase[:, :1])
        phase = phase.diff(dim=1, prepend=first) - synthesis.phase_advances(torch.zeros_like(phase))
    out = torch.stack([torch.log(spec.abs() + 1e-12), phase], dim=2)  # [B, N, 2, bins]
    return out.reshape(x.shape[0], -1, synthesis.frames_per_step * 2 * synthesis.bins)


@pytest.mark.parametrize("phase", ["absolute", "propagated"])
def test_spectrum_loss_is_zero_at_the_input_stft_and_sees_each_half(phase):
    synthesis = ISTFTSynthesis(320, 80, 4, phase)
    loss = SpectrumLoss(synthesis)
    x = _speech(seconds=0.4)
    exact = _spectrum_of(x, synthesis)
    zero = loss(exact, x)
    assert zero["spec/mag"].item() < 1e-4 and zero["spec/phase"].item() < 1e-3
    # the decoder's output must really be what the inverse STFT plays: it reconstructs x
    assert torch.allclose(synthesis(exact)[..., : x.shape[-1] - synthesis.delay], x[..., : -synthesis.delay], atol=1e-4)

    louder = exact.clone().reshape(1, -1, 2, synthesis.bins)
    louder[:, :, 0] += math.log(2.0)
    hit = loss(louder.reshape(exact.shape), x)
    assert hit["spec/mag"].item() == pytest.approx(math.log(2.0), rel=0.05) and hit["spec/phase"].item() < 1e-3

    noisy = exact.clone().reshape(1, -1, 2, synthesis.bins)
    noisy[:, :, 1] += torch.randn_like(noisy[:, :, 1])
    hit = loss(noisy.reshape(exact.shape), x)
    assert hit["spec/mag"].item() < 1e-4 and hit["spec/phase"].item() > 0.3


def test_spectrum_loss_ignores_a_constant_phase_offset_and_wraps():
    # Only advances are judged: a whole-signal phase shift costs nothing; so does a 2 pi error.
    synthesis = ISTFTSynthesis(320, 80, 4, "absolute")
    x = _speech(seconds=0.4)
    shifted = SpectrumLoss(synthesis)(_spectrum_of(x, synthesis, phase_offset=1.0), x)
    assert shifted["spec/phase"].item() < 1e-3
    a = torch.tensor([0.1, 3.0, -3.0, 2 * math.pi + 0.2])
    b = torch.tensor([-0.1, -3.0, 3.0, 0.0])
    expected = torch.tensor([0.2, 2 * math.pi - 6.0, 2 * math.pi - 6.0, 0.2])
    assert torch.allclose(wrapped_distance(a, b), expected, atol=1e-5)


def test_spectrum_loss_weights_phase_by_magnitude():
    # A phase error confined to a bin with no energy costs (almost) nothing; the same error on a loud bin does.
    synthesis = ISTFTSynthesis(320, 80, 4, "propagated")
    t = torch.arange(6400) / 16000
    x = (0.5 * torch.sin(2 * math.pi * 1000 * t))[None, None]  # bin 20 (50 Hz bins)
    exact = _spectrum_of(x, synthesis).reshape(1, -1, 2, synthesis.bins)
    loss = SpectrumLoss(synthesis)
    quiet, loud = exact.clone(), exact.clone()
    quiet[:, :, 1, 120] += 1.0
    loud[:, :, 1, 20] += 1.0
    quiet_loss = loss(quiet.reshape(1, -1, exact.shape[2] * exact.shape[3] * 4), x)["spec/phase"].item()
    loud_loss = loss(loud.reshape(1, -1, exact.shape[2] * exact.shape[3] * 4), x)["spec/phase"].item()
    assert loud_loss > 20 * max(quiet_loss, 1e-6)


def test_adversarial_losses_on_known_logits():
    real, fake = [torch.full((2, 3), 1.0)], [torch.full((2, 3), -1.0)]
    assert discriminator_loss(real, fake, "hinge").item() == 0.0  # both beyond the margin
    assert discriminator_loss(fake, real, "hinge").item() == 4.0
    assert discriminator_loss(real, fake, "lsgan").item() == 1.0  # (1-1)^2 + (-1)^2
    assert generator_loss(fake, "hinge").item() == 2.0
    assert generator_loss(real, "lsgan").item() == 0.0
    feats = [[torch.ones(2, 4), torch.zeros(2, 2)]]
    assert feature_loss(feats, [[torch.zeros(2, 4), torch.zeros(2, 2)]]).item() == 0.5


def test_discriminators_shapes_features_and_gradients():
    disc = Discriminators(periods=(2, 3), mpd_channels=(4, 8), resolutions=((256, 64),), mrd_channels=4)
    x = torch.cat([_speech(0.2), _speech(0.2, seed=1)]).requires_grad_(True)
    out = disc(x)
    assert len(out.logits) == len(out.features) == 3
    assert all(logits.shape[0] == 2 for logits in out.logits)
    assert [len(f) for f in out.features] == [4, 4, 5]  # strided layers + 1 (+ post conv)
    generator_loss(out.logits).backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())
    spectral = Discriminators(periods=(2,), mpd_channels=(4,), resolutions=(), mrd_channels=4, norm="spectral")
    assert len(spectral(x).logits) == 1


def test_schedule_warms_up_then_decays():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(20, 100, 10, "exponential", gamma=0.9) == pytest.approx(0.9**10)
    assert lr_factor(50, 100, 10, "none") == 1.0
    assert not math.isnan(lr_factor(5, 5, 10))
