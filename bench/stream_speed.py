"""Benchmark: PyTorch streaming speed by message size, on one thread.

    python bench/stream_speed.py [--model ID|DIR] [--chunks-ms 20,100,500] [--repeats 2]

Streams examples/speech.wav (10.4 s) through `model.stream()` in chunks of each size: encode (all stages), then
decode the codes in the same chunking. Speed is in multiples of real time (audio seconds per second of wall
clock), best of `--repeats`. A lone stream's cost is mostly per call (PyTorch's per-operator overhead on a
few vectors); the service batches every live stream's frames into one call instead (server.scheduler), which
`bench/streams_per_core.py` measures. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import soundfile as sf
import torch

from codec.presets import load_model

SPEECH = Path(__file__).resolve().parents[1] / "examples" / "speech.wav"


def stream_speed(model, wav: torch.Tensor, chunk: int, repeats: int) -> tuple[float, float]:
    """`[1, 1, T]` -> (encode, decode) speed in multiples of real time, chunks of `chunk` samples."""
    seconds = wav.shape[-1] / model.sample_rate
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        with torch.inference_mode():
            encoder = model.stream(1)
            start = time.perf_counter()
            codes = [encoder.encode(wav[..., i : i + chunk]) for i in range(0, wav.shape[-1], chunk)]
            codes.append(encoder.flush_encoder())
            encoded = time.perf_counter()
            decoder = model.stream(1)
            for c in codes:
                decoder.decode(c)
            decoder.flush_decoder()
            decoded = time.perf_counter()
        best = (min(best[0], encoded - start), min(best[1], decoded - encoded))
    return seconds / best[0], seconds / best[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model id or directory (default: the bundled model)")
    parser.add_argument("--chunks-ms", default="20,100,500", help="message sizes in ms (default 20,100,500)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per size; the best counts (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model).model.eval()
    audio, rate = sf.read(SPEECH, dtype="float32")
    assert rate == model.sample_rate, f"{SPEECH} is {rate} Hz, the model wants {model.sample_rate}"
    wav = torch.from_numpy(audio)[None, None]
    print("| message | encode (x real time) | decode (x real time) |\n| --- | --- | --- |")
    for ms in (int(x) for x in args.chunks_ms.split(",")):
        encode, decode = stream_speed(model, wav, ms * model.sample_rate // 1000, args.repeats)
        print(f"| {ms} ms | {encode:.1f} | {decode:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
