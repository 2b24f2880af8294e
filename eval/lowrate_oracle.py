"""What a low-rate quantizer design could reach, before training it: residual codebooks drawn from a model's
own latents, over groups of consecutive frames, decoded by the model's frozen decoder.

    python -m eval.lowrate_oracle data/corpus/train.csv data/corpus/dev.csv --arms 1x8192x3 2x8192x6

An arm `GxKxS` quantizes vectors of G consecutive latent frames (G x the latent's dimension) with S residual
stages of K codes, each stage's codes drawn at random from the training vectors' residuals at that stage (as
`ResidualQuantizer.draw_codebooks` draws them, without whitening or a learned map) and searched in that full
space; `GxKxS@D` searches in the D principal directions of each stage's training residuals instead (the
cost of a search grows with D), and still subtracts the whole code. G = 2 is a 25 Hz low-rate path on a
50 Hz model; it needs the second frame of a pair before the first can be coded, so it adds one frame of
latency. The table gives each stage count's bits per 20 ms frame, its payload kbit/s, PESQ-WB, STOI and mel
distance on the dev files (`eval.metrics.score`), and the latent's squared error relative to its energy,
beside the model's own quantizer at the same stage counts and the unquantized latent. Nothing is trained,
so an arm's row is a floor for that design on this decoder.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from codec.presets import load_model
from codec.quantizer import Codebook, principal_directions
from eval.dataset import load_audio, manifest_items, spread_per_speaker
from eval.metrics import score


@dataclass(frozen=True)
class Arm:
    group: int  # frames per vector
    codes: int  # codes per stage
    stages: int
    search_dims: int | None = None  # search in this many principal directions (None: the whole vector)

    @classmethod
    def parse(cls, text: str) -> Arm:
        shape, _, dims = text.lower().partition("@")
        try:
            group, codes, stages = (int(part) for part in shape.split("x"))
            search_dims = int(dims) if dims else None
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"an arm is GROUPxCODESxSTAGES[@DIMS], e.g. 2x8192x4 or 1x16384x2@16, not {text!r}"
            ) from None
        if min(group, codes, stages, 1 if search_dims is None else search_dims) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: every part must be at least 1")
        return cls(group, codes, stages, search_dims)

    def bits_per_frame(self, stages: int) -> float:
        return stages * math.log2(self.codes) / self.group

    def __str__(self) -> str:
        return f"{self.group}x{self.codes}x{self.stages}" + (f"@{self.search_dims}" if self.search_dims else "")


def nearest(x: Tensor, codes: Tensor, basis: Tensor | None = None) -> Tensor:
    """Index of each row of `x` `[N, D]` in `codes` `[K, D]` by squared distance (within the span of the
    orthonormal columns of `basis` `[D, d]` when given): the codec's own search, `Codebook.nearest`."""
    if basis is not None:
        x, codes = x @ basis, codes @ basis
    return Codebook.nearest(x, codes)


def grouped(latents: Tensor, group: int) -> Tensor:
    """`[F, D]` -> `[F // group, group * D]`: consecutive frames side by side (a last incomplete group dropped)."""
    frames, dim = latents.shape
    return latents[: frames // group * group].reshape(-1, group * dim)


def drawn_residual_quantizer(train: Tensor, dev: list[Tensor], arm: Arm, seed: int = 0) -> list[list[Tensor]]:
    """Per stage count 1..S, each dev latent `[F, D]` as the arm's codes approximate it."""
    generator = torch.Generator().manual_seed(seed)
    residual = grouped(train, arm.group).clone()
    dev_residuals = [grouped(z, arm.group).clone() for z in dev]
    sums = [torch.zeros_like(r) for r in dev_residuals]
    out = []
    for _ in range(arm.stages):
        if len(residual) < arm.codes:
            raise ValueError(f"arm {arm}: {len(residual)} training vectors cannot give {arm.codes} codes")
        codes = residual[torch.randperm(len(residual), generator=generator)[: arm.codes]].clone()
        basis = principal_directions(residual, arm.search_dims)[1] if arm.search_dims else None
        residual -= codes[nearest(residual, codes, basis)]
        for r, s in zip(dev_residuals, sums):
            q = codes[nearest(r, codes, basis)]
            r -= q
            s += q
        out.append([s.reshape(-1, train.shape[1]).clone() for s in sums])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.lowrate_oracle", description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path, help="manifest whose files the codes are drawn from")
    parser.add_argument("dev", type=Path, help="manifest of the files scored")
    parser.add_argument("--arms", type=Arm.parse, nargs="+", default=[Arm(1, 8192, 3), Arm(2, 8192, 6)])
    parser.add_argument("--model", default=None, help="model id or directory (default: the default model)")
    parser.add_argument("--train-files", type=int, default=3000, help="training files drawn from (3000)")
    parser.add_argument("--per-speaker", type=int, default=5, help="dev files per speaker (5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = load_model(args.model, warn=False).model.eval()
    frame = model.hop_length * math.lcm(*(arm.group for arm in args.arms))  # whole groups for every arm

    def audio_and_latents(path: Path) -> tuple[np.ndarray, Tensor]:
        audio = load_audio(path)
        audio = np.pad(audio, (0, -len(audio) % frame))
        return audio, model.encode_latents(torch.from_numpy(audio)[None, None])[0]

    train_items = manifest_items(args.train)
    random.Random(args.seed).shuffle(train_items)
    dev_items = spread_per_speaker(manifest_items(args.dev), args.per_speaker)
    with torch.inference_mode():
        train = torch.cat([audio_and_latents(it.path)[1] for it in train_items[: args.train_files]])
        dev = [audio_and_latents(it.path) for it in dev_items]
        print(f"{len(train)} training frames, {len(dev)} dev files", flush=True)

        def row(name: str, bits: float | None, approx: list[Tensor]) -> None:
            scores, errors = [], []
            for (audio, z), a in zip(dev, approx):
                scores.append(score(audio, model.decode_latents(a[None])[0, 0].numpy()))
                errors.append(float((a - z).pow(2).sum() / z.pow(2).sum()))
            pesq, stoi, mel = (np.nanmean([getattr(s, m) for s in scores]) for m in ("pesq_wb", "stoi", "mel_distance"))
            rate = " | " if bits is None else f"{bits:.1f} | {bits * model.frame_rate / 1000:.2f}"
            print(f"| {name} | {rate} | {pesq:.2f} | {stoi:.3f} | {mel:.3f} | {np.mean(errors):.3f} |", flush=True)

        print("| quantizer | bits / frame | kbit/s | PESQ-WB | STOI | mel dist | latent error |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        row("unquantized", None, [z for _, z in dev])
        for n in range(1, min(max(arm.stages for arm in args.arms), model.n_stages) + 1):
            own = [model.quantizer(z[None], n).quantized[0] for _, z in dev]
            row(f"the model's, {n} stage(s)", float(sum(model.stage_bits[:n])), own)
        for arm in args.arms:
            for n, approx in enumerate(drawn_residual_quantizer(train, [z for _, z in dev], arm, args.seed), 1):
                searched = f", searched in {arm.search_dims} dims" if arm.search_dims else ""
                row(f"drawn {arm.group} x {arm.codes}{searched}, {n} stage(s)", arm.bits_per_frame(n), approx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
