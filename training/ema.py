"""Exponential moving average of the generator's weights: what dev evaluation and export use."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class EMA:
    """A frozen copy of a model whose parameters follow the trained ones: `ema = d * ema + (1 - d) * param`.

    The decay ramps up as `min(decay, (1 + n) / (10 + n))` after n updates, so the average is not dominated
    by the random initial weights early in training. Buffers are copied as they are, which leaves the
    quantizer's whitening statistics describing the trained weights, not the averaged ones: `calibrate`
    re-estimates them before the copy is used (dev passes, checkpoints).

    Args:
        model: the model to follow (its current weights are the starting point).
        decay: the final decay, e.g. 0.999.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, param in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(param.detach(), 1.0 - decay)
        for ema, buffer in zip(self.model.buffers(), model.buffers()):
            ema.copy_(buffer)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Re-estimate the averaged model's quantizer whitening from its own latents of `batches` (`[B, 1, T]`
        each), all of them together."""
        latents = torch.cat([self.model.encode_latents(audio) for audio in batches])
        self.model.quantizer.calibrate_whiteners(latents)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
