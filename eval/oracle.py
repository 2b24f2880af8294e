"""Where the decoder loses quality: its magnitudes and phases, each swapped for the input's own.

The decoder outputs an STFT (log magnitude and phase per sub-frame) that an inverse STFT plays. This tool
re-synthesises each file from mixes of the decoder's halves and the input's exact STFT in the same framing,
and scores every mix with `eval.metrics.score`:

    model/model    what the codec plays
    model/own      the decoder's own phases, not re-phased (models with `rephase_iters`: the running phase
                   without the re-phasing's corrections)
    model/input    the decoder's magnitudes with the input's phases: the ceiling of a perfect phase
    input/model    the input's magnitudes with the decoder's phases
    input/random   the input's magnitudes with random phases: what phase carrying no information scores
    input/advance  the input's magnitudes and phase advances, from a random start per bin: what a decoder
                   whose advances were exact would score ("propagated" phase, `training.losses.SpectrumLoss`)
    model/pghi     the decoder's magnitudes, phased from themselves by phase-gradient heap integration
    input/pghi     the same from the input's magnitudes: near-transparent, so any gap to it is the magnitudes'
    model/harmonic the decoder's magnitudes with harmonic phases on the input's pYIN f0 track: what a decoder
                   that knew the pitch would get from these magnitudes by the simplest harmonic rule
    input/harmonic the input's magnitudes with the same harmonic phases
    model/prior    "propagated" phase only: the decoder's magnitudes and advance deviations, but on the
                   sub-frames the input's YIN track calls voiced, each bin advances at its nearest harmonic's
                   frequency (`ISTFTSynthesis.harmonic_deviation`): what the pitch path's prior alone gives
    input/prior    the input's magnitudes with the same phases
    model/harm-head  the decoder's magnitudes, harmonic phases on the pitch head's own f0 and voicing, the
                   decoder's phases where the head says unvoiced: what the harmonic rule gives with no side
                   information
    model/harm-yin   the same on the input's YIN track (the pitch head's training target, centred)
    model/harm-sent  the same on a causal YIN track sent at 10 bits per codec frame (`eval.phase.sent_f0_track`):
                   what an f0 side stream of 0.5 kbit/s would give

Beside the scores it prints two training distances of every mix, the trainer's mel loss and the spectral
convergence of `stft/linear` (`training.losses`): which of them ranks the mixes as PESQ-WB does says which
one a decoder should be trained on.

    python -m eval.oracle data/corpus/dev.csv --per-speaker 2 --stages 12

See docs/architecture.md ("Why the model looks as it does") for what it showed.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

from codec.errors import CodecError
from codec.features import causal_stft, hann_window
from codec.synthesis import ISTFTSynthesis
from eval.dataset import list_inputs, load_audio
from eval.metrics import score
from eval.model import get_model
from eval.phase import f0_track, harmonic_phase, pghi_phase, sent_f0_track
from training.losses import LinearSTFTLoss, MultiScaleMelLoss
from training.pitch import yin_f0

MIXES = (
    "model/model",
    "model/own",
    "model/input",
    "input/model",
    "input/random",
    "input/advance",
    "model/pghi",
    "input/pghi",
    "model/harmonic",
    "input/harmonic",
    "model/prior",
    "input/prior",
    "model/harm-head",
    "model/harm-yin",
    "model/harm-sent",
)


@torch.no_grad()
def mixes(model, wav: torch.Tensor, n_stages: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`[1, 1, T]` (T a multiple of the hop) -> the audio `[T - decoder_delay]` of every mix in `MIXES`."""
    syn = model.synthesis
    spectrum, pitch = model._decode(model.quantizer.decode(model.encode(wav, n_stages)))
    log_mag, deviation = syn.split(spectrum)
    phase, prior = deviation, None
    own_phase = None
    if syn.phase == "propagated":
        phase = syn._propagate(deviation)
        if syn.rephase_iters:
            own_phase, phase = phase, syn.played_spectra(syn.magnitudes(log_mag), deviation).angle()
        yin, voiced = yin_f0(wav[:, 0], model.sample_rate, syn.n_fft, syn.hop)
        on_harmonics = torch.where(voiced[..., None], syn.harmonic_deviation(yin / model.sample_rate), deviation)
        prior = syn._propagate(on_harmonics.to(deviation.dtype))
    model_mag = syn.magnitudes(log_mag)
    spec = causal_stft(wav[:, 0], hann_window(syn.n_fft), syn.hop)
    input_mag, input_phase = spec.abs(), spec.angle()
    random_phase = torch.rand(input_phase.shape, generator=generator) * 2 * math.pi
    advance_phase = input_phase - input_phase[:, :1] + random_phase[:, :1]
    frames, bins = input_mag.shape[1:]
    f0 = f0_track(wav[0, 0].numpy(), frames, syn.n_fft, syn.hop, model.sample_rate)
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))
    harmonic = torch.from_numpy(harmonic_phase(f0, bins, syn.n_fft, syn.hop, model.sample_rate, rng))
    chosen = {
        "model/model": (model_mag, phase),
        "model/input": (model_mag, input_phase),
        "input/model": (input_mag, phase),
        "input/random": (input_mag, random_phase),
        "input/advance": (input_mag, advance_phase),
        "model/pghi": (model_mag, _pghi(model_mag, syn)),
        "input/pghi": (input_mag, _pghi(input_mag, syn)),
        "model/harmonic": (model_mag, harmonic[None]),
        "input/harmonic": (input_mag, harmonic[None]),
    }
    if own_phase is not None:
        chosen["model/own"] = (model_mag, own_phase)
    if prior is not None:
        chosen.update({"model/prior": (model_mag, prior), "input/prior": (input_mag, prior)})
        sent, _ = yin_f0(wav[:, 0], model.sample_rate, syn.n_fft, syn.hop, causal=True)
        tracks = {
            "model/harm-yin": yin[0].numpy(),
            "model/harm-sent": sent_f0_track(sent[0].numpy(), syn.frames_per_step),
        }
        if pitch is not None:
            _, log_f0, voicing_logit = pitch
            tracks["model/harm-head"] = torch.where(voicing_logit > 0, log_f0.exp(), 0.0)[0].numpy()
        own = phase[0].double().numpy()
        for name, track in tracks.items():
            ph = harmonic_phase(track[:frames], bins, syn.n_fft, syn.hop, model.sample_rate, rng, unvoiced=own)
            chosen[name] = (model_mag, torch.from_numpy(ph)[None])
    play = ISTFTSynthesis(syn.n_fft, syn.hop, syn.frames_per_step, "absolute")
    out = {}
    for name, (mag, ph) in chosen.items():
        spectra = torch.stack([mag.clamp_min(1e-12).log(), ph.to(mag.dtype)], dim=2)  # [1, N, 2, bins]
        audio = play(spectra.reshape(1, -1, syn.in_dim))
        out[name] = audio[0, 0, : wav.shape[-1] - syn.delay]
    return out


def _pghi(mag: torch.Tensor, syn: ISTFTSynthesis) -> torch.Tensor:
    log_mag = mag[0].clamp_min(1e-12).log().double().numpy()
    return torch.from_numpy(pghi_phase(log_mag, syn.n_fft, syn.hop))[None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.oracle", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="folders, manifest CSVs or audio files")
    parser.add_argument("--model", default=None, help="model id or directory (default: the bundled model)")
    parser.add_argument("--stages", type=int, default=None, help="quantizer stages (default: all)")
    parser.add_argument("--per-speaker", type=int, default=2, help="files per voice (default 2)")
    parser.add_argument("--split", default="dev", help="manifest split (default dev)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random phases")
    args = parser.parse_args(argv)
    try:
        model = get_model(args.model).model
        n_stages = args.stages or model.n_stages
        items = list_inputs(args.inputs, args.split, per_speaker=args.per_speaker)
        generator = torch.Generator().manual_seed(args.seed)
        mel_loss, linear_loss = MultiScaleMelLoss(model.sample_rate), LinearSTFTLoss()
        scores: dict[str, list[tuple[float, ...]]] = {name: [] for name in MIXES}
        for item in items:
            ref = load_audio(item.path)
            ref = ref[: len(ref) - len(ref) % model.hop_length]
            if len(ref) == 0:
                continue
            for name, audio in mixes(model, torch.from_numpy(ref)[None, None], n_stages, generator).items():
                target = torch.from_numpy(ref[: len(audio)])
                s = score(target.numpy(), audio.numpy())
                pair = audio.float()[None, None], target.float()[None, None]
                scores[name].append(
                    (s.pesq_wb, s.stoi, s.mel_distance, float(mel_loss(*pair)), float(linear_loss(*pair)))
                )
    except CodecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(items)} files, {n_stages} stages (magnitude/phase: mean PESQ-WB, STOI, mel distance; "
        "the training distances: mel loss, spectral convergence)"
    )
    for name, rows in scores.items():
        if not rows:  # the prior mixes of an "absolute" phase model
            continue
        pesq, stoi, mel, mel_loss_value, convergence = np.nanmean(np.array(rows, dtype=float), axis=0)
        print(
            f"{name:14s} PESQ {pesq:.2f}  STOI {stoi:.3f}  mel {mel:.3f}  "
            f"mel loss {mel_loss_value:.3f}  convergence {convergence:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
