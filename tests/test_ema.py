"""The trainer's weight average: its quantizer whitening is fitted to many training crops together."""

import torch

from tests.conftest import speechlike, tiny_codec
from training.ema import EMA


def _batch(seed: int, gain: float) -> torch.Tensor:
    return gain * torch.stack([torch.from_numpy(speechlike(0.32, seed=seed + i)).float() for i in range(2)])[:, None]


def _first_whitener(ema: EMA) -> tuple[torch.Tensor, torch.Tensor]:
    w = ema.model.quantizer.stages[0].whitener
    return w.mean.clone(), w.cov.clone()


def test_calibration_fits_the_whitening_to_all_its_batches_together():
    ema = EMA(tiny_codec(), 0.999)
    quiet, loud = _batch(0, 0.05), _batch(10, 0.5)
    ema.calibrate([quiet, loud])
    mean, cov = _first_whitener(ema)
    with torch.no_grad():
        z = torch.cat([ema.model.encode_latents(quiet), ema.model.encode_latents(loud)])
        x = ema.model.quantizer.stages[0].in_proj(z.reshape(-1, z.shape[-1]))
    assert torch.allclose(mean, x.mean(0), atol=1e-5) and torch.allclose(cov, torch.cov(x.t(), correction=0), atol=1e-5)
    ema.calibrate([loud])
    assert not torch.allclose(_first_whitener(ema)[0], mean, atol=1e-4)  # the last batch alone fits another
