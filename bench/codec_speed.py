"""Benchmark: encode/decode speed, peak memory on a long file, .tok bitrate, parameter count.

    python bench/codec_speed.py [--model ID|DIR] [--seconds 60] [--long-minutes 60]

Speed is measured on a real recording repeated to `--seconds` (examples/speech.wav), with 1 and 2 threads,
best of `--repeats`. Peak memory is the max RSS of `simvq-codec compress` and `decompress` subprocesses on a
generated file of `--long-minutes` minutes. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from codec.api import encode_array
from codec.presets import load_model

ROOT = Path(__file__).resolve().parents[1]


def speed(model, wav: np.ndarray, threads: int, repeats: int) -> tuple[float, float]:
    """Encode and decode x real time on `threads` torch threads, best of `repeats`."""
    torch.set_num_threads(threads)
    x = torch.from_numpy(wav)[None, None]
    model.decode(model.encode(x[..., :16000]))  # warm-up (and the re-phasing compiled, if not cached)
    enc, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        codes = model.encode(x)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.decode(codes)
        dec.append(time.perf_counter() - t)
    seconds = len(wav) / model.sample_rate
    return seconds / min(enc), seconds / min(dec)


def peak_rss_mb(args: list[str]) -> float:
    """Run a command; its own peak resident memory (wait4 reports the child's rusage)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.read().decode()}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--long-minutes", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    release = load_model(args.model)
    model = release.model
    speech, rate = sf.read(ROOT / "examples" / "speech.wav", dtype="float32")
    assert rate == model.sample_rate
    reps = int(np.ceil(args.seconds * rate / len(speech)))
    wav = np.tile(speech, reps)[: int(args.seconds * rate)]

    rows = [("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")]
    for threads in (1, 2):
        e, d = speed(model, wav, threads, args.repeats)
        rows += [
            (f"encode, {threads} thread(s)", f"{e:.0f}x real time"),
            (f"decode, {threads} thread(s)", f"{d:.0f}x real time"),
        ]

    for n in (model.n_stages, model.n_stages // 2, 1):
        header, codes = encode_array(speech, rate, release, n_stages=n)
        with tempfile.TemporaryFile() as f:
            from codec.tokfile import TokWriter

            with TokWriter(f, header) as w:
                w.write(codes)
            size = f.tell()
        kbps = size * 8 / (len(speech) / rate) / 1000
        rows.append((f".tok bitrate, {n} stages", f"{kbps:.3f} kbit/s (nominal {model.bitrate(n) / 1000:.3f})"))

    with tempfile.TemporaryDirectory() as tmp:
        long_wav = Path(tmp) / "long.wav"
        with sf.SoundFile(long_wav, "w", rate, 1, subtype="PCM_16") as f:
            for _ in range(int(args.long_minutes * 60 * rate / len(speech)) + 1):
                f.write(speech)
        minutes = sf.info(long_wav).duration / 60
        cli = [sys.executable, "-m", "codec.cli", "--threads", "2"]
        model_args = ["--model", args.model] if args.model else []
        t = time.perf_counter()
        rss_c = peak_rss_mb(cli + ["compress", str(long_wav), f"{tmp}/long.tok", "-q", *model_args])
        tc = time.perf_counter() - t
        t = time.perf_counter()
        rss_d = peak_rss_mb(cli + ["decompress", f"{tmp}/long.tok", f"{tmp}/out.wav", "-q", *model_args])
        td = time.perf_counter() - t
        rows.append((f"peak memory, compress {minutes:.0f} min file", f"{rss_c:.0f} MB ({tc:.0f} s)"))
        rows.append((f"peak memory, decompress {minutes:.0f} min file", f"{rss_d:.0f} MB ({td:.0f} s)"))

    print("| measure | value |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
