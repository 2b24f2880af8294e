"""The stage-count rule: how many residual stages to keep, from a count or a bitrate (one rule, one error)."""

from __future__ import annotations

from typing import Protocol, Sequence

from codec.errors import CodecError


MAX_STAGES = 64  # the most residual stages a model, a .tok file or a request may have (6 bits of the v2 header)


class StageError(CodecError, ValueError):
    """A stage count or bitrate the model cannot give (the CLI exits 2, the service answers 422)."""


class HasStages(Protocol):
    n_stages: int

    def bitrate(self, n_stages: int | None = None) -> float: ...


def shared_width(stage_bits: Sequence[int]) -> int | None:
    """The bits of every code when all the stages of `stage_bits` share one width, else None."""
    return stage_bits[0] if len(set(stage_bits)) == 1 else None


def check_stages(n_stages: int, total: int) -> int:
    """`n_stages` if it lies in 1..`total`, else StageError."""
    if not 1 <= n_stages <= total:
        raise StageError(f"stages must be between 1 and {total}, got {n_stages}")
    return n_stages


def stages_or_all(n_stages: int | None, total: int) -> int:
    """`total` when `n_stages` is None, else `n_stages` checked by :func:`check_stages`."""
    return total if n_stages is None else check_stages(int(n_stages), total)


def stages_for_bitrate(model: HasStages, kbps: float) -> int:
    """The largest number of stages whose nominal bitrate does not exceed `kbps`: NaN and rates <= 0 are
    refused, any rate at or above the top one (infinity included) means every stage, and a positive rate
    below one stage's is refused."""
    if not kbps > 0:  # NaN included
        raise StageError(f"the bitrate must be a number of kbit/s above 0, got {kbps:g}")
    fitting = [n for n in range(1, model.n_stages + 1) if model.bitrate(n) <= kbps * 1000 + 1e-6]
    if not fitting:
        lowest, top = model.bitrate(1) / 1000, model.bitrate() / 1000
        raise StageError(
            f"{kbps:g} kbit/s is below this model's lowest bitrate, {lowest:g} kbit/s (one stage); "
            f"use {lowest:g} to {top:g} kbit/s"
        )
    return fitting[-1]


def resolve_stages(model: HasStages, n_stages: int | None = None, bitrate: float | None = None) -> int:
    """Stage count from `n_stages` or `bitrate` (kbit/s), all stages when neither is given: the rule of the
    CLI, the API, the service and the jobs."""
    if n_stages is not None and bitrate is not None:
        raise StageError("give either the number of stages or the bitrate, not both")
    if bitrate is not None:
        return stages_for_bitrate(model, bitrate)
    return stages_or_all(n_stages, model.n_stages)


def resolve_stage_list(
    model: HasStages, stages: Sequence[int] | None = None, bitrates: Sequence[float] | None = None
) -> list[int] | None:
    """Stage counts for each of `stages` or of `bitrates` (kbit/s) by the rule of :func:`resolve_stages`;
    None when neither list is given (the caller picks its default)."""
    if stages and bitrates:
        raise StageError("give either stage counts or bitrates, not both")
    if bitrates:
        return [stages_for_bitrate(model, kbps) for kbps in bitrates]
    if stages:
        return [check_stages(n, model.n_stages) for n in stages]
    return None
