"""Dev-set evaluation during training: mel loss, spectral convergence, per-stage codebook use, samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import fmean

import torch

from training.losses import LinearSTFTLoss, MultiScaleMelLoss
from training.pitch import yin_f0


@dataclass
class DevResult:
    """One pass over the fixed dev clips.

    Args:
        mel: mean multi-scale log-mel L1 over the clips, all stages.
        mel_at_stages: the same with fewer stages, by stage count (`dev_stages`): the low rates, which the
            all-stage figure does not follow (docs/training.md).
        mel_unquantized: the same with the encoder's latent decoded as it is: the gap to `mel` is what the
            quantizer costs this model.
        convergence: mean spectral convergence (`LinearSTFTLoss`), all stages: over the oracle's mixes it
            ranks phase coherence as PESQ-WB does, where the mel loss does not (docs/architecture.md).
        utilisation: per stage, codes used at least once during the pass / K.
        perplexity: per stage, exp of the entropy of the code histogram (K when all codes are equally used).
        outputs: decoded audio [1, T] of the first clips (for TensorBoard).
        voicing_accuracy, f0_error_cents: a pitch head's agreement with the input's pitch track (None
            without one): the share of sub-frames it calls voiced or unvoiced as the track does, and its
            mean absolute f0 error where both call them voiced.
    """

    mel: float
    mel_unquantized: float
    convergence: float
    utilisation: list[float]
    perplexity: list[float]
    outputs: list[torch.Tensor] = field(default_factory=list)
    voicing_accuracy: float | None = None
    f0_error_cents: float | None = None
    mel_at_stages: dict[int, float] = field(default_factory=dict)

    @property
    def utilisation_mean(self) -> float:
        return sum(self.utilisation) / len(self.utilisation)

    def to_json(self) -> dict:
        """The figures as a line of the dev log holds them (the monitor adds the step and the phase)."""
        return {
            "mel": self.mel,
            "mel_at_stages": {str(k): v for k, v in self.mel_at_stages.items()},
            "mel_unquantized": self.mel_unquantized,
            "convergence": self.convergence,
            "utilisation": self.utilisation,
            "perplexity": self.perplexity,
            "utilisation_mean": self.utilisation_mean,
        } | (
            {}
            if self.voicing_accuracy is None
            else {"voicing_accuracy": self.voicing_accuracy, "f0_error_cents": self.f0_error_cents}
        )


def code_usage(counts: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Utilisation (share of codes used) and perplexity of each stage from one histogram [K_s] per stage."""
    used, perplexity = [], []
    for row in counts:
        row = row.double()
        p = row / row.sum().clamp_min(1)
        used.append(float((row > 0).double().mean()))
        perplexity.append(float((-(p * p.clamp_min(1e-30).log()).sum()).exp()))
    return used, perplexity


@torch.no_grad()
def evaluate(
    model,
    clips: list[torch.Tensor],
    mel_loss: MultiScaleMelLoss,
    linear_loss: LinearSTFTLoss,
    keep: int = 0,
    stages: Sequence[int] = (),
) -> DevResult:
    """Run `model` (eval mode, all stages) over `clips` ([1, T] each), without touching the training RNG; the
    mel loss is also taken at each stage count of `stages` below the model's own."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    fewer = sorted({k for k in stages if 0 < k < model.n_stages})
    counts, mels, unquantized, convergence, outputs = None, [], [], [], []
    mels_at: dict[int, list[float]] = {k: [] for k in fewer}
    agree, frames, cents, voiced_both = 0.0, 0, 0.0, 0
    with torch.random.fork_rng(devices=[]):
        for i, clip in enumerate(clips):
            audio = clip[None].to(device)
            out = model(audio)
            complete = audio.shape[-1] - model.decoder_delay  # as in training: the fade-out is not scored
            mels.append(float(mel_loss(out.audio[..., :complete], audio[..., :complete])))
            convergence.append(float(linear_loss(out.audio[..., :complete], audio[..., :complete])))
            continuous = model.decode_latents(out.latents)
            unquantized.append(float(mel_loss(continuous[..., :complete], audio[..., :complete])))
            for k in fewer:  # the same latents through fewer stages
                decoded = model.decode_latents(model.quantizer(out.latents, k).quantized)
                mels_at[k].append(float(mel_loss(decoded[..., :complete], audio[..., :complete])))
            batch = [c.cpu() for c in out.stage_counts]
            counts = batch if counts is None else [a + b for a, b in zip(counts, batch)]
            if out.log_f0 is not None:
                syn = model.synthesis
                f0, voiced = yin_f0(audio[:, 0], model.sample_rate, syn.n_fft, syn.hop)
                said = out.voicing_logit > 0
                both = said & voiced
                agree, frames = agree + float((said == voiced).sum()), frames + voiced.numel()
                error = 1200 * (out.log_f0 - f0.clamp_min(1.0).log()).abs() / math.log(2.0)
                cents, voiced_both = cents + float(error[both].sum()), voiced_both + int(both.sum())
            if i < keep:
                outputs.append(out.audio[0].float().cpu())
    model.train(was_training)
    utilisation, perplexity = code_usage(counts)
    pitch = (agree / frames, cents / max(voiced_both, 1)) if frames else (None, None)
    at_stages = {k: fmean(v) for k, v in mels_at.items()}
    return DevResult(
        fmean(mels), fmean(unquantized), fmean(convergence), utilisation, perplexity, outputs, *pitch, at_stages
    )


def mel_figure(reference: torch.Tensor, output: torch.Tensor, mel_loss: MultiScaleMelLoss, n_fft: int = 1024):
    """A matplotlib figure with the log-mel spectrograms of a dev clip and its reconstruction ([1, T] each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_fft = n_fft if n_fft in mel_loss.n_ffts else mel_loss.n_ffts[-1]
    device = next(mel_loss.buffers()).device
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for ax, audio, title in zip(axes, (reference, output), ("reference", "decoded")):
        mel = mel_loss.log_mel(audio[None].to(device), n_fft)
        ax.imshow(mel[0].cpu().numpy(), origin="lower", aspect="auto", vmin=-11.5, vmax=3)
        ax.set_title(title)
        ax.set_ylabel("mel band")
    axes[-1].set_xlabel("frame")
    fig.tight_layout()
    return fig
