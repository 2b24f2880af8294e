"""Peer codecs through their real command-line tools: Opus (opusenc/opusdec) and Codec 2 (c2enc/c2dec)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from eval import SAMPLE_RATE
from eval.oggopus import read_opus_stream

OPUS_KBPS = (6.0, 8.0, 12.0)
CODEC2_MODES = ("3200", "1600", "700C")
CODEC2_NOMINAL_KBPS = {"3200": 3.2, "2400": 2.4, "1600": 1.6, "1400": 1.4, "1300": 1.3, "1200": 1.2, "700C": 0.7}
_C2_MAGIC = bytes((0xC0, 0xDE, 0xC2))
_C2_HEADER_BYTES = 7  # magic (3), version major/minor (2), mode (1), flags (1)


class PeerError(RuntimeError):
    """A peer tool ran but failed (non-zero exit or unreadable output)."""


@dataclass
class CodecRun:
    """One encode + decode of a 16 kHz signal by a codec at one setting.

    ``decoded`` is [T'] float at 16 kHz (its length and delay may differ from the input);
    ``num_bytes`` is the size of the compressed file as the codec writes it to disk,
    ``payload_bytes`` the part carrying audio (no container or header), when it can be computed;
    times are wall-clock seconds, including the tools' process start-up for the peers.
    ``codes`` is [S, F] for codecs with discrete tokens (our model), else None.
    """

    decoded: np.ndarray
    num_bytes: int
    payload_bytes: float | None
    encode_seconds: float
    decode_seconds: float
    codes: np.ndarray | None = None


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PeerError(f"{cmd[0]} exited with {proc.returncode}: {tail[0]}")
    return elapsed


@dataclass(frozen=True)
class Opus:
    """Opus through opusenc/opusdec: ``--bitrate kbps --speech --framesize 20`` (VBR), decoded at 16 kHz."""

    kbps: float
    codec = "opus"
    tools = ("opusenc", "opusdec")

    @property
    def setting(self) -> str:
        return f"{self.kbps:g}kbps"

    @property
    def nominal_kbps(self) -> float:
        return self.kbps

    def run(self, wav: np.ndarray) -> CodecRun:
        """Encode and decode ``wav`` [T] (16 kHz float) with the real tools."""
        with tempfile.TemporaryDirectory(prefix="eval-opus-") as tmp:
            src, enc, dec = Path(tmp, "in.wav"), Path(tmp, "out.opus"), Path(tmp, "out.wav")
            sf.write(src, np.clip(wav, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
            t_enc = _run(
                [
                    "opusenc",
                    "--quiet",
                    "--bitrate",
                    f"{self.kbps:g}",
                    "--speech",
                    "--framesize",
                    "20",
                    str(src),
                    str(enc),
                ]
            )
            # opusdec removes the encoder's pre-skip; --float avoids its dithered 16-bit output.
            t_dec = _run(["opusdec", "--quiet", "--float", "--rate", str(SAMPLE_RATE), str(enc), str(dec)])
            data = enc.read_bytes()
            decoded, rate = sf.read(dec, dtype="float32", always_2d=True)
        if rate != SAMPLE_RATE:
            raise PeerError(f"opusdec wrote {rate} Hz instead of {SAMPLE_RATE}")
        info = read_opus_stream(data)
        return CodecRun(decoded[:, 0], len(data), float(info.audio_packet_bytes), t_enc, t_dec)


@dataclass(frozen=True)
class Codec2:
    """Codec 2 through c2enc/c2dec in ``mode`` (e.g. "3200", "1600", "700C"), on 8 kHz 16-bit raw audio.

    The 16 kHz input is resampled to 8 kHz with soxr and the output back to 16 kHz, so it carries no band above 4 kHz.
    """

    mode: str
    codec = "codec2"
    tools = ("c2enc", "c2dec")

    @property
    def setting(self) -> str:
        return self.mode

    @property
    def nominal_kbps(self) -> float:
        return CODEC2_NOMINAL_KBPS.get(self.mode, float("nan"))

    def run(self, wav: np.ndarray) -> CodecRun:
        """Encode and decode ``wav`` [T] (16 kHz float) with the real tools."""
        pcm8 = soxr.resample(np.asarray(wav, dtype=np.float32), SAMPLE_RATE, 8000)
        pcm8 = np.round(np.clip(pcm8, -1.0, 32767 / 32768) * 32768).astype("<i2")
        with tempfile.TemporaryDirectory(prefix="eval-codec2-") as tmp:
            src, enc, dec = Path(tmp, "in.raw"), Path(tmp, "out.c2"), Path(tmp, "out.raw")
            src.write_bytes(pcm8.tobytes())
            t_enc = _run(["c2enc", self.mode, str(src), str(enc)])
            t_dec = _run(["c2dec", self.mode, str(enc), str(dec)])
            data = enc.read_bytes()
            out8 = np.frombuffer(dec.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
        header = _C2_HEADER_BYTES if data.startswith(_C2_MAGIC) else 0
        decoded = soxr.resample(out8, 8000, SAMPLE_RATE) if out8.size else out8
        return CodecRun(decoded, len(data), float(len(data) - header), t_enc, t_dec)


def missing_tools(peer, path: str | None = None) -> list[str]:
    """The tools of ``peer`` that are not on ``path`` (default: $PATH)."""
    return [tool for tool in peer.tools if shutil.which(tool, path=path) is None]


def peer_codecs(
    names: tuple[str, ...] = ("opus", "codec2"),
    opus_kbps: tuple[float, ...] = OPUS_KBPS,
    codec2_modes: tuple[str, ...] = CODEC2_MODES,
) -> list:
    """The peer settings to run: one :class:`Opus` per bitrate and one :class:`Codec2` per mode."""
    unknown = sorted(set(names) - {"opus", "codec2"})
    if unknown:
        raise ValueError(f"unknown peer codec(s) {', '.join(unknown)}; choose from opus, codec2")
    for mode in codec2_modes:
        if mode not in CODEC2_NOMINAL_KBPS:
            raise ValueError(f"unknown Codec 2 mode {mode!r}; choose from {', '.join(CODEC2_NOMINAL_KBPS)}")
    peers: list = []
    if "opus" in names:
        peers += [Opus(float(k)) for k in opus_kbps]
    if "codec2" in names:
        peers += [Codec2(m) for m in codec2_modes]
    return peers
