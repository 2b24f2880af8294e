"""Benchmark: streaming encode and decode speed, onnxruntime against PyTorch, on one thread; the graphs' sizes.

    python bench/onnx_speed.py [--model ID|DIR] [--onnx-dir DIR] [--repeats 3]

Both stream examples/speech.wav (10.4 s) one 20 ms frame per call, all stages: PyTorch through `model.stream()`,
onnxruntime through the reference runner (examples/onnx_runner.py), each on one thread (torch.set_num_threads(1);
onnxruntime's intra- and inter-op pools of 1). Speed is in multiples of real time (audio seconds per second of
wall clock), best of `--repeats`. Without `--onnx-dir` the model is exported to a temporary folder first.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from codec.onnx_export import CONTRACT_FILE, DECODER_FILE, ENCODER_FILE, export_onnx
from codec.presets import load_model

ROOT = Path(__file__).resolve().parents[1]


def onnx_runner():
    """examples/onnx_runner.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("onnx_runner", ROOT / "examples" / "onnx_runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id or directory (default: simvq-16k)")
    parser.add_argument("--onnx-dir", type=Path, help="graphs already exported from that model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pretrained = load_model(args.model, warn=False)
    model, hop = pretrained.model, pretrained.model.hop_length
    wav, rate = sf.read(ROOT / "examples" / "speech.wav", dtype="float32")
    wav = wav[: len(wav) - len(wav) % hop]
    seconds = len(wav) / rate

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.onnx_dir or Path(tmp)
        if args.onnx_dir is None:
            export_onnx(pretrained, folder)
        runner = onnx_runner()
        codec = runner.Codec(folder, threads=1)
        x = torch.from_numpy(wav)[None, None]

        def torch_encode():
            stream = model.stream()
            return torch.cat([stream.encode(x[..., t : t + hop]) for t in range(0, x.shape[-1], hop)], dim=-1)

        def torch_decode(codes):
            stream = model.stream()
            return [stream.decode(codes[..., t : t + 1]) for t in range(codes.shape[-1])]

        def ort_encode():
            return codec.encoder().encode(wav[None])

        def ort_decode(codes):
            return codec.decoder().decode(codes)

        torch_encode(), ort_encode()  # warm-up
        t_enc, codes = best(torch_encode, args.repeats)
        t_dec, _ = best(lambda: torch_decode(codes), args.repeats)
        o_enc, ort_codes = best(ort_encode, args.repeats)
        o_dec, _ = best(lambda: ort_decode(codes.numpy()), args.repeats)
        same = np.array_equal(ort_codes, codes.numpy())
        sizes = {name: (folder / name).stat().st_size for name in (ENCODER_FILE, DECODER_FILE, CONTRACT_FILE)}

    frames = len(wav) // hop
    print(
        f"{seconds:.2f} s of speech ({frames} frames of {1000 * hop / rate:g} ms), streamed one frame per call, "
        f"{model.n_stages} stages, 1 thread, best of {args.repeats}; ONNX codes identical to PyTorch's: {same}\n"
    )
    print("| runtime | encode (x real time) | decode (x real time) | encode ms/frame | decode ms/frame |")
    print("| --- | --- | --- | --- | --- |")
    for name, enc, dec in (
        ("PyTorch " + torch.__version__, t_enc, t_dec),
        ("onnxruntime " + runner.ort.__version__, o_enc, o_dec),
    ):
        print(
            f"| {name} | {seconds / enc:.1f} | {seconds / dec:.1f} | {1000 * enc / frames:.3f} | "
            f"{1000 * dec / frames:.3f} |"
        )
    print("\n| file | bytes | MB |")
    print("| --- | --- | --- |")
    for name, size in sizes.items():
        print(f"| {name} | {size} | {size / 1e6:.2f} |")


if __name__ == "__main__":
    main()
