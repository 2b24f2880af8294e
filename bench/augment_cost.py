"""Benchmark: what each training augmentation adds to the cost of one crop on the DataLoader path.

    python bench/augment_cost.py [--crops 300] [--seconds 1] [--threads 1]

Crops of examples/speech.wav are cut by `training.data.AudioDataset` as training cuts them, first plain, then
with each change of `training.augment` at probability 1, then with all of them. Prints a Markdown table: the
mean time per crop and what the change adds, also per batch of 16 (a CPU training step takes about 1 s).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import soundfile as sf
import torch

from training.config import AugmentConfig
from training.data import AudioDataset, AudioItem

SPEECH = Path(__file__).resolve().parents[1] / "examples" / "speech.wav"
ARMS = {
    "none": {},
    "band: low-pass": dict(band_prob=1.0, highpass_prob=0.0, resample_prob=0.0),
    "band: low-pass + high-pass": dict(band_prob=1.0, highpass_prob=1.0, resample_prob=0.0),
    "band: low-pass + 8 kHz round trip": dict(band_prob=1.0, highpass_prob=0.0, resample_prob=1.0),
    "eq": dict(eq_prob=1.0),
    "noise": dict(noise_prob=1.0),
    "reverb (rt60 up to 0.6 s)": dict(reverb_prob=1.0),
    "all at probability 1": dict(
        band_prob=1.0, highpass_prob=1.0, resample_prob=1.0, eq_prob=1.0, noise_prob=1.0, reverb_prob=1.0
    ),
    "all at probability 0.3": dict(band_prob=0.3, eq_prob=0.3, noise_prob=0.3, reverb_prob=0.3),
}


def per_crop_ms(dataset: AudioDataset, crops: int) -> float:
    """Mean milliseconds of `dataset.crop` over `crops` distinct crops (after a few to warm up)."""
    for slot in range(5):
        dataset.crop((1, 0, 0, slot))
    began = time.perf_counter()
    for slot in range(crops):
        dataset.crop((0, 0, 0, slot))
    return 1000 * (time.perf_counter() - began) / crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=1.0, help="crop length")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate = sf.info(str(SPEECH)).samplerate
    items = [AudioItem(SPEECH, "speaker")]
    segment = round(args.seconds * rate)
    print(f"{args.crops} crops of {segment / rate:g} s at {rate} Hz, {args.threads} thread(s)\n")
    print("| augmentation | ms per crop | added ms per crop | added ms per batch of 16 |")
    print("| --- | --- | --- | --- |")
    base = None
    for name, keys in ARMS.items():
        dataset = AudioDataset(items, rate, segment, gain_db=(-12.0, 0.0), seed=0, augment=AugmentConfig(**keys))
        ms = per_crop_ms(dataset, args.crops)
        base = ms if base is None else base
        print(f"| {name} | {ms:.2f} | {ms - base:.2f} | {16 * (ms - base):.0f} |")


if __name__ == "__main__":
    main()
