#!/usr/bin/env python3
"""Reference runner for the ONNX export of the codec: numpy, soundfile and onnxruntime only (no torch).

A worked example for porting the codec to another language: it streams a WAV file through `encoder.onnx` one
20 ms frame at a time, and codes back through `decoder.onnx` one frame at a time, carrying the graphs' state
as `codec.json` describes it (docs/deploy.md, "ONNX").

    simvq-codec export-onnx onnx/                                   # the graphs and codec.json
    python examples/onnx_runner.py compress onnx/ speech.wav speech.npz
    python examples/onnx_runner.py decompress onnx/ speech.npz restored.wav [--stages 4]
    python examples/onnx_runner.py roundtrip onnx/ speech.wav restored.wav [--stages 4]

`.npz` files hold `codes` [n_stages, frames] (int16), `num_samples` and the model's `sha256`. It refuses what
`simvq-codec` refuses (a missing, unreadable, truncated or empty file, NaN or infinity in the audio, a stage
count out of range, an output it cannot write) with the same message, one line and exit 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf

DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64}


class RunnerError(ValueError):
    """Input or output that the runner refuses, with the command line's message: one line, exit 2."""


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Graph:
    """One graph and its state: `step(x)` runs it on `x` and the current state, keeps the new state and
    returns the graph's main output."""

    def __init__(self, folder: Path, spec: dict, batch: int, threads: int):
        self.session = _session(folder / spec["file"], threads)
        self.spec, self.batch = spec, batch
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.reset()

    def reset(self) -> None:
        """The initial state (a new stream): each tensor filled with its `initial` value."""
        self.state = {
            s["name"]: np.full(
                [self.batch if d == "batch" else d for d in s["shape"]], s["initial"], dtype=DTYPES[s["dtype"]]
            )
            for s in self.spec["state"]
        }

    def step(self, x: np.ndarray) -> np.ndarray:
        names = [self.output] + [s["output"] for s in self.spec["state"]]
        out = self.session.run(names, {self.input: x, **self.state})
        self.state = {s["name"]: value for s, value in zip(self.spec["state"], out[1:])}
        return out[0]


class Codec:
    """The exported codec in a folder written by `simvq-codec export-onnx`."""

    def __init__(self, folder: str | Path, threads: int = 1):
        self.folder = Path(folder)
        self.contract = json.loads((self.folder / "codec.json").read_text())
        if self.contract["format"] != "simvq-codec-onnx/1":
            raise ValueError(f"unknown contract format {self.contract['format']!r}")
        self.threads = threads
        for key in ("sample_rate", "hop_length", "n_stages", "codebook_sizes", "decoder_delay"):
            setattr(self, key, self.contract[key])

    def encoder(self, batch: int = 1) -> Encoder:
        return Encoder(self, batch)

    def decoder(self, batch: int = 1) -> Decoder:
        return Decoder(self, batch)


class Encoder(_Graph):
    """Streaming encoder: `encode(samples)` takes any number of samples and returns the codes of the frames
    they complete ([batch, n_stages, frames]); `flush()` zero-pads the last partial frame."""

    def __init__(self, codec: Codec, batch: int = 1):
        self.hop, self.n_stages = codec.hop_length, codec.n_stages
        self.pending = np.zeros((batch, 0), np.float32)
        super().__init__(codec.folder, codec.contract["encoder"], batch, codec.threads)

    def encode(self, samples: np.ndarray) -> np.ndarray:
        x = np.concatenate([self.pending, np.asarray(samples, np.float32).reshape(self.batch, -1)], axis=1)
        whole = x.shape[1] - x.shape[1] % self.hop
        self.pending = x[:, whole:]
        codes = [self.step(x[:, t : t + self.hop]) for t in range(0, whole, self.hop)]  # one frame per step
        return np.concatenate(codes, axis=2) if codes else np.zeros((self.batch, self.n_stages, 0), np.int64)

    def flush(self) -> np.ndarray:
        if not self.pending.shape[1]:
            return np.zeros((self.batch, self.n_stages, 0), np.int64)
        pad = np.zeros((self.batch, self.hop - self.pending.shape[1]), np.float32)
        return self.encode(pad)


class Decoder(_Graph):
    """Streaming decoder: `decode(codes)` takes codes [batch, stages, frames] (any stage count up to the
    model's) and returns the samples they complete; `flush()` returns the last `decoder_delay` samples.

    The graph returns hop samples per frame; the first `decoder_delay` samples of a stream lie before its
    start and are dropped here, and at the end the state `synthesis.tail` holds the stream's last samples."""

    def __init__(self, codec: Codec, batch: int = 1):
        self.delay, self.codebook_sizes = codec.decoder_delay, np.asarray(codec.codebook_sizes)
        super().__init__(codec.folder, codec.contract["decoder"], batch, codec.threads)

    def reset(self) -> None:
        super().reset()
        self.skip, self.started = self.delay, False

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, np.int64)
        sizes = self.codebook_sizes[: codes.shape[1]]
        if codes.min(initial=0) < 0 or (codes >= sizes[None, :, None]).any():
            raise RunnerError(f"codes must lie in [0, K) for each stage's size K {tuple(sizes.tolist())}")
        out = [self.step(codes[:, :, t : t + 1]) for t in range(codes.shape[2])]  # one frame per step
        audio = np.concatenate(out, axis=1) if out else np.zeros((self.batch, 0), np.float32)
        self.started = self.started or bool(out)
        drop = min(self.skip, audio.shape[1])
        self.skip -= drop
        return audio[:, drop:]

    def flush(self) -> np.ndarray:
        tail = self.state["synthesis.tail"] if self.started else np.zeros((self.batch, 0), np.float32)
        self.reset()
        return tail


def _declared_frames(path: Path) -> int | None:
    """The frames a RIFF/WAVE header declares in its data chunk (None: not a WAV, or the streaming size)."""
    with open(path, "rb") as f:
        if f.read(4) != b"RIFF" or len(f.read(4)) != 4 or f.read(4) != b"WAVE":
            return None
        block_align = 0
        while len(head := f.read(8)) == 8:
            chunk, size = head[:4], int.from_bytes(head[4:], "little")
            if chunk == b"data":
                return None if size in (0, 0xFFFFFFFF) or not block_align else size // block_align
            body = f.read(size + (size & 1))
            if chunk == b"fmt " and len(body) >= 14:
                block_align = int.from_bytes(body[12:14], "little")
    return None


def read_wav(path: str | Path, sample_rate: int) -> np.ndarray:
    """A WAV (FLAC, OGG) at the model's rate -> mono float32 [T], refused as `simvq-codec compress` refuses it:
    missing, unreadable, truncated, empty, or holding NaN or infinity."""
    path = Path(path)
    if not path.is_file():
        raise RunnerError(f"{path} is a directory, not an audio file" if path.is_dir() else f"no such file: {path}")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        detail = str(exc).split(": ")[-1]
        raise RunnerError(f"cannot read {path} as audio (WAV, FLAC or OGG expected): {detail}") from None
    declared = _declared_frames(path)
    if declared is not None and declared > len(audio):
        raise RunnerError(
            f"{path} is truncated: its header declares {declared} frames ({declared / rate:.2f} s) "
            f"but it holds {len(audio)} ({len(audio) / rate:.2f} s)"
        )
    if len(audio) == 0:
        raise RunnerError(f"{path} contains no audio samples")
    if not np.isfinite(audio).all():
        bad = int(np.argmax(~np.isfinite(audio).all(axis=1)))
        raise RunnerError(f"{path} has a non-finite sample (NaN or infinity) at {bad / rate:.3f} s")
    if rate != sample_rate:
        raise RunnerError(f"{path} is {rate} Hz; this model takes {sample_rate} Hz (resample it first)")
    return audio.mean(axis=1)


def check_stages(n_stages: int | None, total: int) -> int:
    """`n_stages` (None: all `total`) if it lies in 1..total, with the command line's message otherwise."""
    if n_stages is None:
        return total
    if not 1 <= n_stages <= total:
        raise RunnerError(f"stages must be between 1 and {total}, got {n_stages}")
    return n_stages


def read_npz(path: str | Path) -> tuple[np.ndarray, int, str]:
    """A `.npz` written by `compress` -> (codes [n_stages, frames] int64, num_samples, sha256)."""
    path = Path(path)
    if not path.is_file():
        raise RunnerError(f"no such file: {path}")
    with open(path, "rb") as f:
        if f.read(2) == b"SV":  # every .tok version starts so (version 1 with "SVQT")
            raise RunnerError(
                f"{path} is a .tok file: decode it with `simvq-codec decompress`; this runner "
                "reads the .npz files its compress writes"
            )
    try:
        with np.load(path) as data:
            return data["codes"].astype(np.int64), int(data["num_samples"]), str(data["sha256"])
    except (OSError, ValueError, KeyError):
        raise RunnerError(f"{path} is not a .npz file written by this runner's compress") from None


def _writable(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise RunnerError(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir():
        raise RunnerError(f"cannot write {path}: the folder {path.parent} does not exist")
    return path


def compress(codec: Codec, wav_path: str | Path, n_stages: int | None = None) -> tuple[np.ndarray, int]:
    """A mono WAV at the model's rate -> (codes [n_stages, frames], its sample count), frame by frame."""
    n = check_stages(n_stages, codec.n_stages)
    audio = read_wav(wav_path, codec.sample_rate)[None]  # [1, T]
    encoder = codec.encoder()
    codes = np.concatenate([encoder.encode(audio), encoder.flush()], axis=2)[0]
    return codes[:n], audio.shape[1]


def decompress(codec: Codec, codes: np.ndarray, num_samples: int | None = None) -> np.ndarray:
    """Codes [stages, frames] -> samples [num_samples], frame by frame."""
    decoder = codec.decoder()
    audio = np.concatenate([decoder.decode(codes[None]), decoder.flush()], axis=1)[0]
    return audio[:num_samples]


def run(args: argparse.Namespace) -> int:
    folder = Path(args.onnx_dir)
    if not (folder / "codec.json").is_file():
        raise RunnerError(f"{folder} holds no codec.json: write the graphs with `simvq-codec export-onnx {folder}`")
    codec = Codec(folder, args.threads)
    out = _writable(args.output)
    if args.command in ("compress", "roundtrip"):
        codes, num_samples = compress(codec, args.input, args.stages)
    else:
        codes, num_samples, sha256 = read_npz(args.input)
        if sha256 != codec.contract["sha256"]:
            raise RunnerError(f"{args.input} was made by other weights than {args.onnx_dir}'s")
        codes = codes[: check_stages(args.stages, codes.shape[0])]
    buf = io.BytesIO()
    if args.command == "compress":
        np.savez(buf, codes=codes.astype(np.int16), num_samples=num_samples, sha256=codec.contract["sha256"])
        summary = f"{codes.shape[0]} stages x {codes.shape[1]} frames"
    else:
        sf.write(buf, decompress(codec, codes, num_samples), codec.sample_rate, format="WAV", subtype="FLOAT")
        summary = f"{num_samples} samples from {codes.shape[0]} stages"
    try:
        out.write_bytes(buf.getvalue())
    except OSError as exc:
        cause = exc.strerror or str(exc)
        raise RunnerError(f"cannot write {out}: {cause[0].lower() + cause[1:]}") from None
    print(f"{out}: {summary}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, src, dst in (
        ("compress", "input.wav", "output.npz"),
        ("decompress", "input.npz", "output.wav"),
        ("roundtrip", "input.wav", "output.wav"),
    ):
        p = sub.add_parser(name)
        p.add_argument("onnx_dir", help="folder written by `simvq-codec export-onnx`")
        p.add_argument("input", metavar=src)
        p.add_argument("output", metavar=dst)
        p.add_argument("--stages", type=int, help="stages to keep or decode (default: all)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except RunnerError as exc:
        print(f"onnx_runner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
