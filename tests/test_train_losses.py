"""training.losses and training.discriminators: values on known inputs, shapes, gradients, the schedule."""

import math

import pytest
import torch

from tests.conftest import speechlike
from training.discriminators import Discriminators
from training.losses import ComplexSTFTLoss, MultiScaleMelLoss, discriminator_loss, feature_loss, generator_loss
from training.schedule import lr_factor


def _speech(seconds=0.5, seed=0):
    return torch.from_numpy(speechlike(seconds, seed=seed))[None, None]


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
    assert all(l.shape[0] == 2 for l in out.logits)
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
