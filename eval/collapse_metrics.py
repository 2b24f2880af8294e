"""Collapse measurements over a dev set: code utilisation, perplexity and effective rank of latents and codes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from codec.errors import AudioError
from training.data import dev_clips, load_items
from training.dev import code_usage
from training.losses import MultiScaleMelLoss

SEARCH_ELEMENTS = 1 << 24
"""Frames per nearest-code search chunk are chosen so that one distance matrix holds at most this many floats."""


def usage(counts: Tensor) -> tuple[float, float]:
    """(utilisation, perplexity) of one codebook from its code counts `[K]`.

    Utilisation is the share of codes picked at least once; perplexity is exp of the entropy of the code
    histogram: K when every code is used equally often, 1 when one code takes every frame."""
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"expected code counts shaped [K], got {tuple(counts.shape)}")
    utilisation, perplexity = code_usage(counts[None])
    return utilisation[0], perplexity[0]


def effective_rank(x: Tensor, center: bool = True) -> float:
    """exp of the entropy of the normalised singular values of `x [N, D]` (Roy & Vetterli, 2007).

    D for N points spread equally in every direction, 1 for points on one line; 0 for an all-zero matrix.
    With `center`, the mean row is removed first, so an offset shared by every row is not counted as a
    direction of the data."""
    if x.dim() != 2:
        raise ValueError(f"expected a matrix [N, D], got {tuple(x.shape)}")
    x = x.detach().double().cpu()
    if center:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if not torch.isfinite(total) or total <= 0:
        return 0.0
    p = s / total
    entropy = -(p * p.clamp_min(1e-300).log()).sum()
    return float(entropy.exp())


@dataclass
class DevSet:
    """Fixed dev audio for collapse measurements.

    Args:
        clips: `[1, T]` float32 clips at the model rate, T a multiple of the hop, longest first.
        mel_clips: how many of the clips (spread over speakers) also get a reconstruction mel distance.
    """

    clips: list[Tensor]
    mel_clips: int = 16

    @property
    def samples(self) -> int:
        return sum(c.shape[-1] for c in self.clips)


def load_dev_set(
    source: str | Path,
    sample_rate: int,
    hop_length: int,
    max_minutes: float = 0.0,
    clip_seconds: float = 10.0,
    mel_clips: int = 16,
) -> DevSet:
    """Dev clips from a manifest or folder, round-robin over speakers (the same set on every run).

    Args:
        source: manifest CSV or folder (`training.data.load_items`); a manifest's rows of any split are used.
        sample_rate, hop_length: the model's; clips are resampled and cut to whole frames.
        max_minutes: stop adding clips past this much audio (0: every file).
        clip_seconds: longest clip kept (longer files are cut).
        mel_clips: clips that also get a reconstruction mel distance at each measurement.
    """
    items = load_items(source)
    count = len(items)
    if max_minutes > 0:
        mean = np.mean([i.duration for i in items if i.duration] or [clip_seconds])
        count = min(count, math.ceil(1.5 * max_minutes * 60 / min(mean, clip_seconds)) + 8)
    clips = dev_clips(items, sample_rate, hop_length, count, int(clip_seconds * sample_rate) // hop_length * hop_length)
    # dev_clips interleaves speakers: keep that order when cutting at max_minutes, so every speaker is in.
    kept, total, limit = [], 0, max_minutes * 60 * sample_rate
    for clip in clips:
        if limit and total >= limit:
            break
        kept.append(clip)
        total += clip.shape[-1]
    if not kept:
        raise AudioError(f"no usable dev audio in {source}")
    mel_first = kept[:mel_clips]
    rest = sorted(kept[mel_clips:], key=lambda c: -c.shape[-1])
    return DevSet(mel_first + rest, min(mel_clips, len(kept)))


@dataclass
class DevMeasure:
    """One collapse measurement of the single-stage codebook over a dev set.

    Args:
        frames: dev frames quantized (the utilisation cannot exceed frames / K).
        used: distinct codes picked over the dev set.
        utilisation: used / K.
        perplexity: exp of the entropy of the dev code histogram.
        latent_rank: effective rank of the encoder outputs `[frames, D]` (centred).
        codebook_rank: effective rank of the K codes `[K, D]` (centred).
        latent_rms: root mean square of the encoder outputs (their scale against the codes').
        codebook_rms: root mean square of the codes.
        mel: mean multi-scale log-mel L1 of the reconstructions of the first `mel_clips` clips.
    """

    frames: int
    used: int
    utilisation: float
    perplexity: float
    latent_rank: float
    codebook_rank: float
    latent_rms: float
    codebook_rms: float
    mel: float

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def measure(model, dev: DevSet, mel_loss: MultiScaleMelLoss | None = None, batch_size: int = 16) -> DevMeasure:
    """Encode every dev clip with the first quantizer stage of `model` (eval mode) and measure collapse.

    Clips are padded to the longest of their batch; the encoder is causal, so padding does not change
    the frames before it, and only each clip's own frames are counted."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stage = model.quantizer.stages[0]
    codebook = stage.codebook().detach().float()
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    latents = []
    try:
        for start in range(0, len(dev.clips), batch_size):
            group = dev.clips[start : start + batch_size]
            longest = max(c.shape[-1] for c in group)
            audio = torch.zeros(len(group), 1, longest)
            for i, clip in enumerate(group):
                audio[i, :, : clip.shape[-1]] = clip
            z = model.encode_latents(audio.to(device)).float()
            for i, clip in enumerate(group):
                frames = z[i, : clip.shape[-1] // model.hop_length]
                latents.append(frames.cpu())
                found = _nearest(stage, stage.lookup_input(frames), codebook)
                counts += torch.bincount(found.cpu(), minlength=model.codebook_size)
        mels = []
        if mel_loss is not None:
            for clip in dev.clips[: dev.mel_clips]:
                audio = clip[None].to(device)
                mels.append(float(mel_loss(model(audio).audio, audio)))
    finally:
        model.train(was_training)
    z = torch.cat(latents)
    utilisation, perplexity = usage(counts)
    return DevMeasure(
        frames=int(z.shape[0]),
        used=int((counts > 0).sum()),
        utilisation=utilisation,
        perplexity=perplexity,
        latent_rank=effective_rank(z),
        codebook_rank=effective_rank(codebook),
        latent_rms=float(z.pow(2).mean().sqrt()),
        codebook_rms=float(codebook.pow(2).mean().sqrt()),
        mel=sum(mels) / len(mels) if mels else float("nan"),
    )


def _nearest(stage, z: Tensor, codebook: Tensor) -> Tensor:
    """The stage's own nearest-code search on lookup-space inputs, in chunks so that `[chunk, K]` distances
    stay small."""
    chunk = max(1, SEARCH_ELEMENTS // codebook.shape[0])
    return torch.cat([stage.nearest(z[i : i + chunk], codebook) for i in range(0, z.shape[0], chunk)])
