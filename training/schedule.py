"""Learning-rate schedule: linear warm-up, then cosine or exponential decay, as a pure function of the step."""

from __future__ import annotations

import math


def lr_factor(
    step: int, total: int, warmup: int, decay: str = "cosine", min_ratio: float = 0.0, gamma: float = 1.0
) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of a `total`-step schedule.

    Being a function of the step alone, the schedule resumes exactly from a checkpoint's step."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "exponential":
        return gamma ** (step - warmup)
    return 1.0
