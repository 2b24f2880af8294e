"""Benchmark: where the time of one batched streaming step goes (torch.profiler), encode and decode apart.

    python bench/step_profile.py [--model ID|DIR] [--rows 4,32] [--steps 50] [--top 12] [--onnx]

For each row count, a `codec.batched.StreamBatch` of the model streams examples/speech.wav (each row from
another point of the clip) one 20 ms frame per step on one thread. After a warm-up, `--steps` encode steps
run under torch.profiler, then as many decode steps of their codes. Prints per direction: wall milliseconds
per step, the operator calls per step, the share of the wall time that no operator accounts for (Python
around the operators), and the top operators by self CPU time. Beside the profiled runs, the same steps are
timed without the profiler.

`--onnx` also times onnxruntime's batched steps of the exported graphs (`examples/onnx_runner.py`, one
thread) on the same frames, and says whether the first row's codes and samples are the same at every row
count: the condition for a batched onnxruntime step to give each stream what it gets alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from codec.batched import StreamBatch  # noqa: E402
from codec.onnx_export import export_onnx  # noqa: E402
from codec.presets import load_model  # noqa: E402
from onnx_speed import onnx_runner  # noqa: E402  (bench/ is the script's own folder)


def frames_of(speech: torch.Tensor, rows: int, steps: int, hop: int) -> list[torch.Tensor]:
    """`steps` frames `[rows, hop]`: row r reads the clip from its own offset, wrapping around."""
    n = speech.shape[0] // hop
    clip = speech[: n * hop].reshape(n, hop)
    return [torch.stack([clip[(r * 37 + k) % n] for r in range(rows)]) for k in range(steps)]


def encode_steps(batch: StreamBatch, slots: list[int], frames: list[torch.Tensor]) -> tuple[float, list]:
    """Each frame through one encode step: (wall seconds, the codes of each step)."""
    start, codes = time.perf_counter(), [batch.encode(slots, x) for x in frames]
    return time.perf_counter() - start, codes


def decode_steps(batch: StreamBatch, slots: list[int], codes: list[torch.Tensor]) -> float:
    """Each step's codes through one decode step: wall seconds."""
    start = time.perf_counter()
    for c in codes:
        batch.decode(slots, c)
    return time.perf_counter() - start


def onnx_steps(codec, frames: list[torch.Tensor], warmup: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Each frame through onnxruntime's encoder in one batched step, then each step's codes through its decoder:
    (encode seconds, decode seconds, after `warmup` steps; the first row's codes and samples, every step)."""
    rows = frames[0].shape[0]
    encoder, decoder = codec.encoder(rows), codec.decoder(rows)
    t_enc = t_dec = 0.0
    codes, samples = [], []
    for k, x in enumerate(frames):
        start = time.perf_counter()
        c = encoder.step(x.numpy())
        middle = time.perf_counter()
        samples.append(decoder.step(c)[0])
        if k >= warmup:
            t_enc, t_dec = t_enc + middle - start, t_dec + time.perf_counter() - middle
        codes.append(c[0])
    return t_enc, t_dec, np.concatenate(codes, axis=-1), np.concatenate(samples)


def summary(prof: profile, wall: float, steps: int, top: int) -> str:
    """Operator calls, the time outside operators and the top operators by self CPU time, per step."""
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    outermost = [e for e in events if e.cpu_parent is None]
    in_ops = sum(e.cpu_time_total for e in outermost) / 1e6
    calls = sum(1 for e in outermost) / steps
    totals: dict[str, list[float]] = {}
    for e in events:
        t = totals.setdefault(e.name, [0, 0.0])
        t[0] += 1
        t[1] += e.self_cpu_time_total
    lines = [
        f"{1000 * wall / steps:.2f} ms/step profiled, {calls:.0f} operator calls/step from Python "
        f"({len(events) / steps:.0f} with the ones they call), {100 * (1 - in_ops / wall):.0f} % of the wall time "
        "outside any operator",
        "",
        "| operator | calls/step | self ms/step |",
        "| --- | --- | --- |",
    ]
    for op, (n, self_us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {op} | {n / steps:.1f} | {self_us / 1e3 / steps:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model id or directory (default: the bundled model)")
    p.add_argument("--rows", default="4,32", help="streams per step, comma-separated (default 4,32)")
    p.add_argument("--steps", type=int, default=50, help="profiled steps per direction (default 50)")
    p.add_argument("--top", type=int, default=12, help="operators listed per direction (default 12)")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also time onnxruntime's batched steps of the exported graphs on the same frames, and check "
        "that the first row's codes and samples do not depend on the row count",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pretrained = load_model(args.model, warn=False)
    model = pretrained.model.eval()
    speech, rate = sf.read(REPO / "examples" / "speech.wav", dtype="float32")
    speech = torch.from_numpy(speech)
    hop = model.hop_length

    for rows in (int(r) for r in args.rows.split(",")):
        batch = StreamBatch(model, capacity=2 * rows)
        enc, dec = [batch.open() for _ in range(rows)], [batch.open() for _ in range(rows)]
        frames = frames_of(speech, rows, 10 + 2 * args.steps, hop)
        _, codes = encode_steps(batch, enc, frames[:10])  # warm-up: allocations, packed weights, codebooks
        decode_steps(batch, dec, codes)
        t_enc, codes = encode_steps(batch, enc, frames[10 : 10 + args.steps])
        t_dec = decode_steps(batch, dec, codes)
        with profile(activities=[ProfilerActivity.CPU]) as prof_enc:
            p_enc, codes = encode_steps(batch, enc, frames[10 + args.steps :])
        with profile(activities=[ProfilerActivity.CPU]) as prof_dec:
            p_dec = decode_steps(batch, dec, codes)
        print(f"\n## {rows} streams per step, 1 thread, {args.steps} steps\n")
        per_step = [1000 * t / args.steps for t in (t_enc, t_dec)]
        print(f"without the profiler: encode {per_step[0]:.2f} ms/step, decode {per_step[1]:.2f} ms/step")
        for name, prof, wall in (("encode", prof_enc, p_enc), ("decode", prof_dec, p_dec)):
            print(f"\n### {name}\n\n" + summary(prof, wall, args.steps, args.top))
    if args.onnx:
        onnx_table(pretrained, speech, [int(r) for r in args.rows.split(",")], args.steps)
    return 0


def onnx_table(pretrained, speech: torch.Tensor, row_counts: list[int], steps: int) -> None:
    """onnxruntime's batched steps at each row count, and whether the first row's outputs depend on it."""
    hop = pretrained.model.hop_length
    with tempfile.TemporaryDirectory() as folder:
        export_onnx(pretrained, Path(folder))
        codec = onnx_runner().Codec(folder, threads=1)
        results = {rows: onnx_steps(codec, frames_of(speech, rows, 10 + steps, hop), 10) for rows in row_counts}
    print(f"\n## onnxruntime, the exported graphs, 1 thread, {steps} steps\n")
    print("| rows | encode ms/step | decode ms/step | first row as at the first row count: codes | samples |")
    print("| --- | --- | --- | --- | --- |")
    _, _, codes0, samples0 = results[row_counts[0]]
    for rows, (t_enc, t_dec, codes, samples) in results.items():
        print(
            f"| {rows} | {1000 * t_enc / steps:.2f} | {1000 * t_dec / steps:.2f} | {np.array_equal(codes, codes0)} | "
            f"{np.array_equal(samples, samples0)} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
