"""The public Python API: compress and decompress files and streams, encode and decode arrays.

`compress`/`decompress` stream in blocks through the model's streaming state, so memory stays flat
whatever the length of the input. `encode_array`/`decode_array` are the in-memory forms the server uses.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import soxr
import torch
from tqdm import tqdm

from codec.audio import AudioInfo, AudioReader, AudioWriter, output_format, read_audio
from codec.errors import AudioError, CodecError
from codec.model import SimVQCodec
from codec.output import open_output
from codec.presets import load_model, model_for_tokens
from codec.pretrained import Pretrained
from codec.stages import resolve_stages
from codec.tokfile import TokHeader, TokReader, TokWriter

Source = str | os.PathLike | BinaryIO
EncodeFn = Callable[[torch.Tensor, int], torch.Tensor]  # offline `SimVQCodec.encode`: `[1, 1, T]`, n -> `[1, S, F]`
DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # offline `SimVQCodec.decode`: `[1, S, F]` -> `[1, 1, F * hop]`
DECODE_BLOCK_FRAMES = 500  # 10 s at 50 Hz: bounds the decoder's activations on long files


def as_pretrained(model: Pretrained | str | os.PathLike | None) -> Pretrained:
    """`model` as it is, or the preset id or directory it names loaded (None: the default model)."""
    if isinstance(model, Pretrained):
        return model
    if isinstance(model, SimVQCodec):
        raise CodecError(
            "token files name the model that made them, and a bare SimVQCodec has no identity: "
            "pass what codec.load_model returns"
        )
    return load_model(model)


def _device(model: SimVQCodec) -> torch.device:
    return next(model.parameters()).device


# --- in memory --------------------------------------------------------------------------------------
def encode_array(
    wav: np.ndarray, sample_rate: int, model: Pretrained, n_stages: int | None = None
) -> tuple[TokHeader, np.ndarray]:
    """Mono or `[T, C]` float audio at any rate -> (header, codes `[S, F]` int64)."""
    codec = model.model
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    if wav.ndim != 1 or wav.size == 0:
        raise AudioError("audio must be a non-empty 1-D array (or [samples, channels])")
    if not np.isfinite(wav).all():
        raise AudioError("audio contains NaN or infinite samples")
    if sample_rate != codec.sample_rate:
        wav = soxr.resample(wav, sample_rate, codec.sample_rate).astype(np.float32)
    return _encode_mono(wav, model, n_stages)


def encode_audio(
    src: Source, model: Pretrained, n_stages: int | None = None, encode: EncodeFn | None = None
) -> tuple[TokHeader, np.ndarray]:
    """A whole audio file (path, `-` or file object) -> (header, codes `[S, F]` int64), in memory: the file
    is read once by `codec.audio` (mix-down, resampling, truncation and non-finite samples refused there).
    `encode` runs the model call (default: `model.model.encode`; the server passes its batching one)."""
    wav, _info = read_audio(src, model.model.sample_rate)
    return _encode_mono(wav, model, n_stages, encode)


def _encode_mono(
    wav: np.ndarray, model: Pretrained, n_stages: int | None, encode: EncodeFn | None = None
) -> tuple[TokHeader, np.ndarray]:
    """Checked mono float32 `[T]` at the model's rate -> (header, codes)."""
    codec = model.model
    n = resolve_stages(codec, n_stages)
    codes = (encode or codec.encode)(torch.from_numpy(wav).to(_device(codec))[None, None], n)[0]
    return model.header(n, len(wav)), codes.cpu().numpy()


def decode_array(header: TokHeader, codes: np.ndarray, model: Pretrained) -> np.ndarray:
    """(header, codes `[S, F]`) -> float32 audio with exactly `header.num_samples` samples, after checking
    that `model` made the codes (`Pretrained.check`)."""
    header = model.check(header)
    return decode_codes(codes, model.model, header.num_samples)


def decode_codes(codes: np.ndarray, model: SimVQCodec, num_samples: int, decode: DecodeFn | None = None) -> np.ndarray:
    """Codes `[S, F]` -> the first `num_samples` float32 samples, with no identity check: for a caller that
    has already matched the header to the model (the server picks the model by the header). `decode` runs
    the model call (default: `model.decode`; the server passes its batching one)."""
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=_device(model))
    wav = (decode or model.decode)(codes[None])[0, 0].cpu().numpy()
    return wav[:num_samples]


# --- files and streams ------------------------------------------------------------------------------
@contextlib.contextmanager
def open_input(src: Source) -> Iterator[BinaryIO]:
    """A binary source: a path (CodecError when it is not a file), `-` for stdin, or a file object as is."""
    if src == "-":
        yield sys.stdin.buffer
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise CodecError(f"no such file: {path}")
        with open(path, "rb") as f:
            yield f
    else:
        yield src


def _progress(enabled: bool, total_seconds: float | None, desc: str) -> tqdm:
    total = None if total_seconds is None else round(total_seconds, 1)
    return tqdm(
        total=total,
        unit="s",
        unit_scale=False,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} s audio [{elapsed}<{remaining}]",
    )


def compress(
    src: Source,
    dst: Source,
    model: Pretrained | str | None = None,
    n_stages: int | None = None,
    bitrate: float | None = None,
    progress: bool = False,
) -> tuple[TokHeader, AudioInfo]:
    """Compress audio (path, `-` or file object) into a .tok file, streaming in blocks.

    `model`: what `load_model` returns, or a preset id or model directory (None: the default model).
    Returns the header as written (counts filled in) and what the input was.
    """
    release = as_pretrained(model)
    codec = release.model
    n = resolve_stages(codec, n_stages, bitrate)
    with AudioReader(src, codec.sample_rate) as reader:
        info = reader.info
        # The exact length is known up front only when no resampling changes it.
        known = info.frames if info.sample_rate == codec.sample_rate else None
        header = release.header(n, known)
        seconds = None if info.frames is None else info.frames / info.sample_rate
        total = 0
        stream = codec.stream(1)
        with open_output(dst) as sink, _progress(progress, seconds, "compress") as bar:
            writer = None  # nothing is written until the first block has passed the input checks (on a pipe,
            device = _device(codec)  # input that fails within its first block leaves no output at all)
            for block in reader.blocks():
                total += len(block)
                codes = stream.encode(torch.from_numpy(block).to(device)[None, None], n)[0].cpu().numpy()
                writer = writer or TokWriter(sink, header)
                writer.write(codes)
                bar.update(len(block) / codec.sample_rate)
            writer = writer or TokWriter(sink, header)
            writer.write(stream.flush_encoder(n)[0].cpu().numpy())
            writer.close(total)
    return release.header(n, total), info


def decompress(
    src: Source, dst: Source, model: Pretrained | str | None = None, format: str | None = None, progress: bool = False
) -> tuple[TokHeader, int]:
    """Decode a .tok file (path, `-` or file object) to WAV or FLAC. Returns (header, clipped samples).

    The output has exactly the original number of samples. Without `model`, the installed model whose
    weights hash the file carries is loaded (`presets.model_for_tokens`); the file never names a folder.
    Returns the header completed by the model (`Pretrained.check`).
    """
    format = output_format(dst, format)
    with open_input(src) as source:
        reader = TokReader(source, block_frames=DECODE_BLOCK_FRAMES)
        release = as_pretrained(model if model is not None else model_for_tokens(reader.header))
        header = release.check(reader.header)
        codec = release.model
        device = _device(codec)
        seconds = None if header.num_samples is None else header.num_samples / header.sample_rate
        stream = codec.stream(1)
        with (
            torch.inference_mode(),  # as `SimVQCodec.decode`: no autograd bookkeeping of each operation
            open_output(dst) as sink,
            _progress(progress, seconds, "decompress") as bar,
            AudioWriter(sink, codec.sample_rate, format, num_frames=header.num_samples) as writer,
        ):
            held = np.zeros(0, np.float32)  # the last block waits until the true length is known
            written = 0
            for block in reader:
                audio = stream.decode(torch.from_numpy(block).to(device)[None])[0, 0].cpu().numpy()
                if len(held):
                    writer.write(held)
                    written += len(held)
                    bar.update(len(held) / codec.sample_rate)
                held = audio
            held = np.concatenate([held, stream.flush_decoder()[0, 0].cpu().numpy()])
            header = release.check(reader.header)  # counts are filled in once the trailer has been read
            writer.write(held[: header.num_samples - written])
            bar.update(len(held) / codec.sample_rate)
    return header, writer.clipped
