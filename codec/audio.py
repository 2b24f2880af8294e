"""Audio input and output: any WAV, FLAC or OGG in, mono float32 at the model rate out, in blocks.

Files go through soundfile; resampling through soxr's streaming resampler, so a long file never sits
in memory whole. Pipes (`-`) cannot seek, which libsndfile needs, so a WAV on stdin is parsed here
as a stream and other containers are spooled to a temporary file first; WAV to stdout is written with
its length in the header when known (else the streaming convention 0xFFFFFFFF).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import soundfile as sf
import soxr

from codec.errors import AudioError

BLOCK_SECONDS = 10.0
OUTPUT_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
UNNAMED_INPUT = "the input"  # how messages name an in-memory input (never its Python repr)


@dataclass
class AudioInfo:
    """What the input was before conversion."""

    sample_rate: int
    channels: int
    frames: int | None  # None when reading a stream of unknown length
    format: str

    def needs_conversion(self, target_rate: int) -> bool:
        return self.sample_rate != target_rate or self.channels != 1

    def describe(self) -> str:
        return f"{self.format}, {self.sample_rate} Hz, {self.channels} channel{'s' if self.channels > 1 else ''}"


def _stdin() -> BinaryIO:
    return sys.stdin.buffer


def _stdout() -> BinaryIO:
    return sys.stdout.buffer


# --- reading ----------------------------------------------------------------------------------------
_WAV_FLOAT, _WAV_PCM, _WAV_EXTENSIBLE = 3, 1, 0xFFFE
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # data sizes that mean "until the end" (how WAV is streamed)
_SKIP_PIECE = 1 << 16


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes, looping over short reads (pipes, raw files); fewer only at the end of the stream."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


@dataclass(frozen=True)
class WavLayout:
    """What a RIFF/WAVE header declares. `data_bytes` is None for the streaming "until the end" size."""

    tag: int
    channels: int
    sample_rate: int
    block_align: int
    bits: int
    data_bytes: int | None

    @property
    def frames(self) -> int | None:
        return None if self.data_bytes is None or self.block_align == 0 else self.data_bytes // self.block_align


def read_wav_layout(stream: BinaryIO, name: str, head: bytes = b"") -> WavLayout:
    """Parse RIFF chunks up to the start of the data chunk (`head`: bytes already taken from `stream`).

    Leaves `stream` at the first sample. Raises AudioError when this is not a WAV with a fmt chunk
    before its data.
    """
    buffer = head

    def take(n: int) -> bytes:
        nonlocal buffer
        out, buffer = buffer[:n], buffer[n:]
        return out + _read_exactly(stream, n - len(out)) if len(out) < n else out

    if take(4) != b"RIFF" or len(take(4)) != 4 or take(4) != b"WAVE":
        raise AudioError(f"{name} is not a RIFF/WAVE stream")
    fmt = None
    while True:
        chunk_id, size = take(4), take(4)
        if len(chunk_id) < 4 or len(size) < 4:
            raise AudioError(f"{name} ended before its data chunk")
        (size,) = struct.unpack("<I", size)
        if chunk_id == b"data":
            break
        left = size + (size & 1)
        body = take(min(left, _SKIP_PIECE))
        left -= len(body)
        if chunk_id == b"fmt ":
            fmt = body
        while left > 0:  # skip the rest in pieces: a chunk's claimed size costs no memory
            piece = take(min(left, _SKIP_PIECE))
            if not piece:
                break
            left -= len(piece)
    if fmt is None or len(fmt) < 16:
        raise AudioError(f"{name} has no valid fmt chunk before its data")
    tag, channels, rate, _, block_align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _WAV_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]
    return WavLayout(tag, channels, rate, block_align, bits, None if size in _UNKNOWN_SIZES else size)


def truncated(name: str, declared: int, found: int, sample_rate: int) -> AudioError:
    """The one message for audio that holds fewer frames than its header declares (every input path)."""
    return AudioError(
        f"{name} is truncated: its header declares {declared} frames ({declared / sample_rate:.2f} s) "
        f"but it holds {found} ({found / sample_rate:.2f} s)"
    )


def check_wav_complete(file, name: str, frames: int, sample_rate: int) -> None:
    """Raise `truncated` when a seekable WAV (path or file object) declares more frames than the `frames`
    libsndfile found in it (libsndfile quietly shortens the count to the data present)."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return check_wav_complete(f, name, frames, sample_rate)
    start = file.tell()
    try:
        file.seek(0)
        layout = read_wav_layout(file, name)
    except AudioError:
        return  # libsndfile read it as WAV anyway (RF64, say): nothing to compare with
    finally:
        file.seek(start)
    if layout.frames is not None and layout.frames > frames:
        raise truncated(name, layout.frames, frames, sample_rate)


class _StreamingWav:
    """A minimal PCM/float WAV reader for non-seekable streams (RIFF chunks in order, data last)."""

    def __init__(self, stream: BinaryIO, head: bytes, name: str):
        self.stream, self.name = stream, name
        layout = read_wav_layout(stream, name, head)
        tag, bits, channels, rate, block_align = (
            layout.tag,
            layout.bits,
            layout.channels,
            layout.sample_rate,
            layout.block_align,
        )
        dtypes = {
            (_WAV_PCM, 8): "u1",
            (_WAV_PCM, 16): "<i2",
            (_WAV_PCM, 32): "<i4",
            (_WAV_FLOAT, 32): "<f4",
            (_WAV_FLOAT, 64): "<f8",
        }
        if (tag, bits) == (_WAV_PCM, 24):
            self.dtype = "int24"
        elif (tag, bits) in dtypes:
            self.dtype = dtypes[(tag, bits)]
        else:
            raise AudioError(f"unsupported WAV sample format in {name} (format tag {tag}, {bits} bits)")
        if channels == 0 or rate == 0 or block_align != channels * bits // 8:
            raise AudioError(f"the WAV header of {name} is inconsistent (channels, rate or block size)")
        self.channels, self.samplerate, self.block_align = channels, rate, block_align
        self.frames = layout.frames
        self._remaining = None if self.frames is None else self.frames * block_align

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        """`[n, channels]` blocks; a stream that ends before its declared length raises `truncated`
        before the short block is handed out."""
        done = 0
        while self._remaining is None or self._remaining > 0:
            want = frames * self.block_align
            if self._remaining is not None:
                want = min(want, self._remaining)
            data = _read_exactly(self.stream, want)
            if self._remaining is not None and len(data) < want:
                raise truncated(self.name, self.frames, done + len(data) // self.block_align, self.samplerate)
            data = data[: len(data) - len(data) % self.block_align]
            if not data:
                return
            if self._remaining is not None:
                self._remaining -= len(data)
            done += len(data) // self.block_align
            yield self._decode(data).reshape(-1, self.channels)

    def _decode(self, data: bytes) -> np.ndarray:
        if self.dtype == "int24":
            raw = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
            ints = (raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)) << 8 >> 8
            return ints.astype(np.float32) / 2**23
        x = np.frombuffer(data, self.dtype)
        if self.dtype == "u1":
            return (x.astype(np.float32) - 128) / 128
        if x.dtype.kind == "i":
            return x.astype(np.float32) / float(2 ** (8 * x.itemsize - 1))
        return x.astype(np.float32)


def input_name(src: str | os.PathLike | BinaryIO) -> str:
    """How messages name an input: its path, "stdin", or "the input" (an in-memory upload, say)."""
    if src == "-":
        return "stdin"
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    name = getattr(src, "name", None)
    return name if isinstance(name, str) and name else UNNAMED_INPUT


class AudioReader:
    """Read audio as mono float32 blocks at `target_rate`.

    Args:
        src: a path, `-` for stdin, or a binary file object (seekable, or a WAV stream).
        target_rate: output sample rate (Hz).
        block_seconds: size of the blocks read from the source.
    Use as a context manager; `info` describes the source, `blocks()` yields `[n]` arrays.
    """

    def __init__(self, src: str | os.PathLike | BinaryIO, target_rate: int, block_seconds: float = BLOCK_SECONDS):
        self.target_rate, self.block_seconds = target_rate, block_seconds
        self._spool = None
        self.name = input_name(src)
        if isinstance(src, (str, os.PathLike)) and src != "-":
            path = Path(src)
            if not path.exists():
                raise AudioError(f"no such file: {path}")
            if path.is_dir():
                raise AudioError(f"{path} is a directory, not an audio file")
            self._file = self._open_soundfile(path)
            self._check_complete(path)
        else:
            self._file = self._open_stream(_stdin() if src == "-" else src)
        rate, channels = self._file.samplerate, self._file.channels
        frames = getattr(self._file, "frames", None)
        fmt = getattr(self._file, "format", "WAV")
        self.info = AudioInfo(rate, channels, frames, fmt)
        if frames == 0:
            self.close()
            raise AudioError(f"{self.name} contains no audio samples")

    def _check_complete(self, file) -> None:
        if self._file.format in ("WAV", "WAVEX"):
            try:
                check_wav_complete(file, self.name, self._file.frames, self._file.samplerate)
            except AudioError:
                self.close()
                raise

    def _open_soundfile(self, file) -> sf.SoundFile:
        try:
            return sf.SoundFile(file)
        except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
            detail = str(exc).split(": ")[-1]
            raise AudioError(f"cannot read {self.name} as audio (WAV, FLAC or OGG expected): {detail}") from None

    def _open_stream(self, stream: BinaryIO):
        seekable = getattr(stream, "seekable", lambda: False)()
        if seekable:
            self._file = self._open_soundfile(stream)
            self._check_complete(stream)
            return self._file
        head = _read_exactly(stream, 12)
        if head[:4] == b"RIFF":
            return _StreamingWav(stream, head, self.name)
        # FLAC and OGG need seeking: spool to a temporary file (disk, not memory).
        self._spool = tempfile.TemporaryFile()
        self._spool.write(head)
        shutil.copyfileobj(stream, self._spool, 1 << 20)
        self._spool.seek(0)
        return self._open_soundfile(self._spool)

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if isinstance(self._file, sf.SoundFile):
            self._file.close()
        if self._spool is not None:
            self._spool.close()

    def blocks(self) -> Iterator[np.ndarray]:
        """Mono float32 blocks at the target rate; raises AudioError on non-finite samples."""
        rate = self.info.sample_rate
        resampler = (
            None if rate == self.target_rate else soxr.ResampleStream(rate, self.target_rate, 1, dtype="float32")
        )
        block = max(1, int(self.block_seconds * rate))
        seen, total = 0, 0
        if isinstance(self._file, sf.SoundFile):
            source = self._file.blocks(block, dtype="float32", always_2d=True)
        else:
            source = self._file.blocks(block)
        try:
            for chunk in source:
                if not np.isfinite(chunk).all():
                    bad = seen + int(np.argmax(~np.isfinite(chunk).all(axis=1)))
                    raise AudioError(f"{self.name} has a non-finite sample (NaN or infinity) at {bad / rate:.3f} s")
                seen += len(chunk)
                mono = chunk.mean(axis=1, dtype=np.float32) if chunk.shape[1] > 1 else chunk[:, 0].astype(np.float32)
                out = resampler.resample_chunk(mono) if resampler else mono
                total += len(out)
                if len(out):
                    yield out
        except sf.LibsndfileError as exc:
            raise AudioError(f"{self.name} is damaged: {exc}") from None
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                yield tail
        if seen == 0:
            raise AudioError(f"{self.name} contains no audio samples")


def read_audio(src: str | os.PathLike | BinaryIO, target_rate: int) -> tuple[np.ndarray, AudioInfo]:
    """Whole-file convenience: mono float32 `[T]` at `target_rate`, and what the source was."""
    with AudioReader(src, target_rate) as reader:
        blocks = list(reader.blocks())
    return np.concatenate(blocks), reader.info


def read_audio_bytes(data: bytes, target_rate: int) -> tuple[np.ndarray, AudioInfo]:
    """`read_audio` for an in-memory upload."""
    return read_audio(io.BytesIO(data), target_rate)


# --- writing ----------------------------------------------------------------------------------------
def to_pcm16(wav: np.ndarray) -> tuple[np.ndarray, int]:
    """Float audio -> (16-bit PCM `<i2`, number of samples clipped): samples beyond [-1, 1] are clipped,
    the rest rounded to steps of 1/32767. The one float-to-PCM rule of files, HTTP and WebSocket output."""
    over = np.abs(wav) > 1.0
    clipped = int(over.sum())
    if clipped:
        wav = np.clip(wav, -1.0, 1.0)
    return np.round(wav * 32767.0).astype("<i2"), clipped


def output_format(dst: str | os.PathLike | BinaryIO, requested: str | None = None) -> str:
    """ "WAV" or "FLAC": as requested, else by the destination's extension, else WAV."""
    if requested:
        fmt = requested.upper()
        if fmt not in OUTPUT_FORMATS.values():
            raise AudioError(f"unsupported output format {requested!r}: use wav or flac")
        return fmt
    if isinstance(dst, (str, os.PathLike)) and dst != "-":
        suffix = Path(dst).suffix.lower()
        if suffix and suffix not in OUTPUT_FORMATS:
            raise AudioError(f"cannot write {suffix} files: the output must end in .wav or .flac")
        return OUTPUT_FORMATS.get(suffix, "WAV")
    return "WAV"


def wav_header(sample_rate: int, num_frames: int | None) -> bytes:
    """44-byte PCM16 mono WAV header; unknown length uses the streaming convention 0xFFFFFFFF."""
    data = 0xFFFFFFFF if num_frames is None else num_frames * 2
    riff = 0xFFFFFFFF if num_frames is None else 36 + data
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        riff,
        b"WAVE",
        b"fmt ",
        16,
        _WAV_PCM,
        1,
        sample_rate,
        sample_rate * 2,
        2,
        16,
        b"data",
        data,
    )


def _empty_flac() -> AudioError:
    return AudioError("the audio is empty (0 samples) and FLAC cannot hold an empty stream: write WAV instead")


class _Kept:
    """The file object libsndfile writes through: an exception in its `write` (a full disk, say) is kept and
    the write reports nothing written, instead of the exception being printed and lost in the C callback;
    `AudioWriter` raises it once libsndfile returns."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.error = f, None

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self._f.write(data)
            except Exception as exc:  # noqa: BLE001 - raised by AudioWriter once libsndfile returns
                self.error = exc
        return 0

    def __getattr__(self, name: str):
        return getattr(self._f, name)


class AudioWriter:
    """Write mono float32 blocks as 16-bit WAV or FLAC, counting samples that had to be clipped.

    On a non-seekable stream (a pipe), WAV is written as it comes, its header with the first block;
    FLAC is spooled to a temporary file and copied out on a successful close. Leaving the context on an
    exception writes nothing more: an error before the first block leaves the stream untouched. FLAC cannot
    hold an empty stream (a length of 0 means "unknown" to its readers), so closing one with no samples
    raises AudioError.

    Args:
        dst: a path, `-` for stdout, or a binary file object.
        sample_rate: Hz.
        format: "WAV" or "FLAC" (default: by extension, else WAV).
        num_frames: total length when known (lets a WAV on a pipe carry its real length).
    """

    def __init__(
        self,
        dst: str | os.PathLike | BinaryIO,
        sample_rate: int,
        format: str | None = None,
        num_frames: int | None = None,
    ):
        self.format = output_format(dst, format)
        if self.format == "FLAC" and num_frames == 0:
            raise _empty_flac()
        self.clipped = 0
        self.frames = 0
        self._path = dst if isinstance(dst, (str, os.PathLike)) and dst != "-" else None
        self._stream: BinaryIO | None = None
        self._header: bytes | None = None  # a piped WAV's header, until the first block goes with it
        self._spool = None
        self._kept: _Kept | None = None
        stream = _stdout() if dst == "-" else dst if not isinstance(dst, (str, os.PathLike)) else None
        if stream is not None and not getattr(stream, "seekable", lambda: False)():
            if self.format == "WAV":
                self._stream, self._header = stream, wav_header(sample_rate, num_frames)
                self._file = None
                return
            self._spool, self._target = tempfile.TemporaryFile(), stream  # FLAC needs seeking: spool
            stream = self._spool
        if stream is not None:
            stream = self._kept = _Kept(stream)
        self._file = self._checked(
            sf.SoundFile,
            stream if stream is not None else dst,
            "w",
            sample_rate,
            1,
            format=self.format,
            subtype="PCM_16",
        )

    def _checked(self, call, *args, **kwargs):
        """`call` on libsndfile, raising the error its file object kept (a failed write) if there is one."""
        try:
            out = call(*args, **kwargs)
        except (AssertionError, RuntimeError):  # soundfile asserts on short writes; LibsndfileError
            if self._kept is not None and self._kept.error is not None:
                raise self._kept.error from None
            raise
        if self._kept is not None and self._kept.error is not None:
            raise self._kept.error
        return out

    def write(self, block: np.ndarray) -> None:
        pcm, clipped = to_pcm16(block)
        self.clipped += clipped
        self.frames += len(pcm)
        if self._file is not None:
            self._checked(self._file.write, pcm)
        else:
            self._write_header()
            self._stream.write(pcm.tobytes())

    def _write_header(self) -> None:
        if self._header is not None:
            self._stream.write(self._header)
            self._header = None

    def close(self) -> None:
        """Finish the output (the header of an empty piped WAV, a spooled FLAC's bytes)."""
        if self.format == "FLAC" and self.frames == 0:
            self.abort()
            if self._path is not None:
                os.unlink(self._path)
            raise _empty_flac()
        if self._file is not None:
            self._checked(self._file.close)
        if self._spool is not None:
            self._spool.seek(0)
            shutil.copyfileobj(self._spool, self._target, 1 << 20)
            self._spool.close()
        if self._stream is not None:
            self._write_header()
            self._stream.flush()

    def abort(self) -> None:
        """Stop without finishing: nothing more reaches a stream (a spooled FLAC is dropped)."""
        if self._file is not None:
            with contextlib.suppress(Exception):  # the error being handled is the one to report
                self._file.close()
        if self._spool is not None:
            self._spool.close()
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.flush()

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_audio(dst: str | os.PathLike | BinaryIO, wav: np.ndarray, sample_rate: int, format: str | None = None) -> int:
    """Whole-array convenience; returns the number of clipped samples."""
    with AudioWriter(dst, sample_rate, format, num_frames=len(wav)) as writer:
        writer.write(wav)
    return writer.clipped
