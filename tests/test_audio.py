"""codec.audio's input rules, the same on every path: a file, an in-memory upload, a pipe."""

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from codec.audio import AudioReader, read_audio
from codec.errors import AudioError

EXAMPLE = Path(__file__).parents[1] / "examples" / "speech.wav"
FRAMES = 165_842  # examples/speech.wav, as its header says


class Pipe(io.RawIOBase):
    """A non-seekable stream that hands out at most 7 bytes per read, as a pipe may."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), 7, len(self._data))
        b[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def head_of_example(nbytes: int) -> bytes:
    """`head -c nbytes examples/speech.wav`: the header still says 165,842 frames."""
    return EXAMPLE.read_bytes()[:nbytes]


def huge_header_wav() -> bytes:
    """A PCM16 mono WAV whose data chunk claims 2**31 frames and holds 10 bytes."""
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    data_size = 2**32 - 2  # 2**31 frames of 2 bytes
    return (
        b"RIFF"
        + struct.pack("<I", 36 + 10)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_size)
        + bytes(10)
    )


def every_path(data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "in.wav"
    path.write_bytes(data)
    return {"file": path, "memory": io.BytesIO(data), "pipe": io.BufferedReader(Pipe(data)), "raw pipe": Pipe(data)}


@pytest.mark.parametrize("make, declared", [(lambda: head_of_example(150_000), FRAMES), (huge_header_wav, 2**31 - 1)])
def test_truncated_wav_is_refused_on_every_path_with_one_message(tmp_path, make, declared):
    messages = set()
    for kind, src in every_path(make(), tmp_path).items():
        with pytest.raises(AudioError, match="truncated") as err:
            read_audio(src, 16000)
        text = str(err.value)
        assert f"declares {declared} frames" in text, (kind, text)
        name = str(src) if kind == "file" else "the input"
        assert text.startswith(name + " is truncated"), (kind, text)
        messages.add(text.removeprefix(name))
    assert len(messages) == 1, messages


def test_truncation_is_found_before_any_sample_is_read_from_a_file(tmp_path):
    path = tmp_path / "half.wav"
    path.write_bytes(head_of_example(150_000))
    with pytest.raises(
        AudioError,
        match=r"half.wav is truncated: its header declares 165842 frames \(10.37 s\) "
        r"but it holds 74978 \(4.69 s\)",
    ):
        AudioReader(path, 16000)


def test_complete_and_unknown_length_wavs_are_accepted(tmp_path):
    whole = EXAMPLE.read_bytes()
    for kind, src in every_path(whole, tmp_path).items():
        assert len(read_audio(src, 16000)[0]) == FRAMES, kind
    # the streaming convention: a data size of 0xFFFFFFFF means "until the end"
    streamed = whole[:40] + struct.pack("<I", 0xFFFFFFFF) + whole[44:]
    assert len(read_audio(io.BufferedReader(Pipe(streamed)), 16000)[0]) == FRAMES
    # a trailing chunk after the data (LIST, say) is fine
    assert len(read_audio(io.BytesIO(whole + b"LIST" + struct.pack("<I", 4) + b"INFO"), 16000)[0]) == FRAMES


def test_in_memory_input_is_named_without_python_internals():
    x = np.zeros(1600, np.float32)
    x[800] = np.nan
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
    for src in (io.BytesIO(buf.getvalue()), io.BufferedReader(Pipe(buf.getvalue()))):
        with pytest.raises(AudioError) as err:
            read_audio(src, 16000)
        assert str(err.value) == "the input has a non-finite sample (NaN or infinity) at 0.050 s"
    with pytest.raises(AudioError) as err:
        read_audio(io.BytesIO(b"not audio at all"), 16000)
    assert str(err.value).startswith("cannot read the input as audio") and "0x" not in str(err.value)
