"""A run's phases as ranges of steps: which phase a step belongs to, and the learning-rate schedule it follows."""

from __future__ import annotations

from dataclasses import dataclass

from training.config import TrainConfig, with_phase

SINGLE_PHASE = "train"
"""The name of the one phase of a run without `phases`."""


@dataclass(frozen=True)
class PhaseSpan:
    """Where one phase lies in a run; steps are 0-based generator step indices.

    Args:
        index: the phase's place in `cfg.phases` (0 for a run without phases).
        name: its name (`SINGLE_PHASE` for a run without phases).
        start, end: the phase trains steps `start` to `end - 1`.
        schedule_start, schedule_end: the learning-rate schedule it follows warms up from `schedule_start` and
            decays until `schedule_end`: its own steps, or with `restart_schedule: false` those of the phases
            it continues as well.
        adv_start: where the discriminators' schedule starts: the first adversarial step of that schedule.
        adversarial: the phase trains against the discriminators (`is_adversarial`).
    """

    index: int
    name: str
    start: int
    end: int
    schedule_start: int
    schedule_end: int
    adv_start: int
    adversarial: bool


def is_adversarial(cfg: TrainConfig) -> bool:
    """A config trains against the discriminators: `adv` and a weight on their losses."""
    weights = cfg.loss.weights
    return cfg.adv and (weights["adv/gen"] > 0 or weights["adv/feat"] > 0)


def phase_spans(cfg: TrainConfig) -> list[PhaseSpan]:
    """The spans of `cfg`'s phases in order (one span of `cfg.steps` without phases)."""
    if not cfg.phases:
        return [PhaseSpan(0, SINGLE_PHASE, 0, cfg.steps, 0, cfg.steps, 0, is_adversarial(cfg))]
    starts, start = [], 0
    for phase in cfg.phases:
        starts.append(start)
        start += phase.steps
    groups: list[list[int]] = []  # phases that share one schedule
    for i, phase in enumerate(cfg.phases):
        if i and not phase.restart_schedule:
            groups[-1].append(i)
        else:
            groups.append([i])
    spans = []
    for group in groups:
        schedule_start, schedule_end = starts[group[0]], starts[group[-1]] + cfg.phases[group[-1]].steps
        adv_start = None
        for i in group:
            phase = cfg.phases[i]
            adversarial = is_adversarial(with_phase(cfg, phase))
            if adversarial and adv_start is None:
                adv_start = starts[i]
            spans.append(
                PhaseSpan(
                    i,
                    phase.name,
                    starts[i],
                    starts[i] + phase.steps,
                    schedule_start,
                    schedule_end,
                    starts[i] if adv_start is None else adv_start,
                    adversarial,
                )
            )
    return spans


def span_at(spans: list[PhaseSpan], step: int) -> PhaseSpan:
    """The span that trains `step` (the last one for a step past the end)."""
    return next((span for span in spans if step < span.end), spans[-1])


def adversarial_steps_before(spans: list[PhaseSpan], step: int) -> int:
    """How many of the steps before `step` trained against the discriminators."""
    return sum(max(0, min(step, span.end) - span.start) for span in spans if span.adversarial)
