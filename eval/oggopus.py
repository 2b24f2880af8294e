"""Minimal Ogg Opus reader: split a .opus file into packets to measure the payload without container overhead."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from codec.errors import AudioError

_PAGE = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, sequence, crc, segments


@dataclass(frozen=True)
class OpusStreamInfo:
    """What an Ogg Opus file holds, in bytes and 48 kHz samples.

    ``audio_packet_bytes`` excludes the Ogg page headers and the OpusHead/OpusTags header packets.
    """

    file_bytes: int
    audio_packet_bytes: int
    audio_packets: int
    pre_skip: int
    final_granule: int

    @property
    def duration_seconds(self) -> float:
        """Decoded duration (final granule position minus pre-skip) in seconds."""
        return max(0, self.final_granule - self.pre_skip) / 48000.0


def read_opus_stream(data: bytes) -> OpusStreamInfo:
    """Parse the Ogg pages of a single-stream Opus file (as written by opusenc)."""
    packets: list[int] = []
    current = 0
    pos = 0
    granule = 0
    while pos < len(data):
        if len(data) - pos < _PAGE.size:
            raise AudioError(f"truncated Ogg page header at byte {pos}")
        capture, _version, _flags, page_granule, _serial, _seq, _crc, nseg = _PAGE.unpack_from(data, pos)
        if capture != b"OggS":
            raise AudioError(f"not an Ogg page at byte {pos}")
        lacing = data[pos + _PAGE.size : pos + _PAGE.size + nseg]
        pos += _PAGE.size + nseg
        if len(lacing) != nseg or pos + sum(lacing) > len(data):
            raise AudioError("truncated Ogg page body")
        for value in lacing:
            current += value
            if value < 255:
                packets.append(current)
                current = 0
        pos += sum(lacing)
        if page_granule >= 0:
            granule = page_granule
    if len(packets) < 2 or not data[_PAGE.size + data[_PAGE.size - 1] :].startswith(b"OpusHead"):
        raise AudioError("not an Ogg Opus stream (no OpusHead/OpusTags packets)")
    head_start = _PAGE.size + data[_PAGE.size - 1]
    (pre_skip,) = struct.unpack_from("<H", data, head_start + 10)
    return OpusStreamInfo(
        file_bytes=len(data),
        audio_packet_bytes=sum(packets[2:]),
        audio_packets=len(packets) - 2,
        pre_skip=pre_skip,
        final_granule=granule,
    )
