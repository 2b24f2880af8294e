"""The .tok container: bit-packed codec tokens with a checked header and a CRC32 (docs/token-file.md)."""

from __future__ import annotations

import dataclasses
import operator
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from codec.errors import TokFormatError
from codec.stages import MAX_STAGES, shared_width

MAGIC = b"SV"  # every .tok file starts with these two bytes; the third is the version (2), or "Q" of version 1
MAGIC_V1 = b"SVQT"  # version 1: these four bytes, then the version byte 1
VERSION = 2  # what writers write unless a header asks for version 1
VERSIONS = (1, 2)
FLAG_COUNTS_IN_TRAILER = 0x01  # v1 flags byte: num_samples/num_frames were unknown at header time
KNOWN_FLAGS = FLAG_COUNTS_IN_TRAILER
V2_COUNTS_IN_TRAILER = 0x40  # v2 byte 3: bits 0-5 hold n_stages - 1, bit 6 this flag, bit 7 is reserved
V2_RESERVED = 0x80

MAX_SAMPLE_RATE = 384_000
MAX_HOP_LENGTH = 2**32 - 1
MAX_HOP_LENGTH_V2 = 2**16 - 1
MAX_BITS = 16
MAX_FRAMES = 10**10
MAX_MODEL_ID_BYTES = 255
MAX_SAMPLES_V2_HEADER = 2**32 - 1  # longer files keep their count in the trailer
EXPLICIT_WIDTHS = 3  # v2 gives stages 1-3 a width each and stages 4..S one shared width

_PREFIX = struct.Struct("<4sBBH")  # v1: magic, version, flags, header length (bytes after this prefix)
_FIXED = struct.Struct("<8sIIBBQQB")  # v1: weights hash, sr, hop, stages, bits, samples, frames, model id length
_COUNTS = struct.Struct("<QQ")  # v1: num_samples, num_frames (the trailer of a streamed file)
_HEADER_V2 = struct.Struct("<2sBB4sHHI")  # magic, version, stages|flags, weights hash, hop, widths, num_samples
_COUNTS_V2 = struct.Struct("<Q")  # v2: num_samples (the trailer of a streamed file)
_CRC = struct.Struct("<I")
MIN_HEADER_LENGTH = _FIXED.size + 1
MAX_HEADER_LENGTH = _FIXED.size + MAX_MODEL_ID_BYTES
_MIN_FILE_V2 = _HEADER_V2.size + _CRC.size  # the smallest file: an empty recording

_READ_CHUNK = 1 << 20  # bytes per read(): bounds memory whatever the header claims
_WRITE_BLOCK = 65536  # frames per packing step in write_tok


def _int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TokFormatError(f"{name} must be an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TokFormatError(f"{name} must be an integer, got {type(value).__name__}") from None


def _check_counts(num_samples: int, num_frames: int, hop_length: int) -> None:
    if not 0 <= num_frames <= MAX_FRAMES:
        raise TokFormatError(f"num_frames {num_frames} out of range [0, {MAX_FRAMES}]")
    if num_samples < 0 or -(-num_samples // hop_length) != num_frames:
        raise TokFormatError(
            f"num_frames {num_frames} is inconsistent with num_samples {num_samples} and hop {hop_length}"
            f" (expected ceil(num_samples / hop) = {-(-max(num_samples, 0) // hop_length)})"
        )


def _widths_word(stage_bits: tuple[int, ...]) -> int | None:
    """v2's u16 of four nibbles (b - 1): stages 1, 2, 3, then the one width of stages 4..S; 0 for a stage the
    file does not have. None when stages 4..S differ (the form cannot hold them)."""
    rest = set(stage_bits[EXPLICIT_WIDTHS:])
    if len(rest) > 1:
        return None
    nibbles = [b - 1 for b in stage_bits[:EXPLICIT_WIDTHS]] + [0] * (EXPLICIT_WIDTHS - len(stage_bits))
    nibbles.append(rest.pop() - 1 if rest else 0)
    return sum(n << 4 * i for i, n in enumerate(nibbles))


def _stage_bits_of_word(word: int, n_stages: int) -> tuple[int, ...]:
    nibbles = [word >> 4 * i & 0xF for i in range(EXPLICIT_WIDTHS + 1)]
    bits = tuple(nibbles[min(s, EXPLICIT_WIDTHS)] + 1 for s in range(n_stages))
    if _widths_word(bits) != word:
        raise TokFormatError(f"stage widths 0x{word:04x} set bits for stages the file does not have ({n_stages})")
    return bits


def bits_text(stage_bits: Sequence[int]) -> str:
    """`12 x 10 bits`, or `3 stages: 14+10+10 bits`."""
    if len(set(stage_bits)) == 1:
        return f"{len(stage_bits)} x {stage_bits[0]} bits"
    return f"{len(stage_bits)} stages: {'+'.join(map(str, stage_bits))} bits"


@dataclass(frozen=True)
class TokHeader:
    """What a .tok file says about its codes; every field is range-checked on construction.

    A writer fills in every field from its model; a version-2 file stores neither the model id nor the
    sample rate (the weights hash names the model, which has them), so reading one gives None for both
    until `codec.Pretrained.check` completes the header from the model that matches.

    Args:
        model_id: the preset id of the model that made the codes, 1..255 UTF-8 bytes; version 1 stores it,
            version 2 does not (None when read from a version-2 file).
        weights_hash: the first bytes of that model's weights sha256: 8 (version 1), 4 or 8 (version 2
            stores the first 4).
        sample_rate: Hz of the audio, 1..384000 (None when read from a version-2 file).
        hop_length: samples per frame, 1..2**32-1 (version 2: 1..65535).
        n_stages: residual stages S stored per frame, 1..MAX_STAGES (64).
        stage_bits: log2(codebook size) of each stage, 1..16 each (an int: that width for every stage).
            Version 1 holds one width for all stages; version 2 one for each of stages 1-3 and one shared
            by stages 4..S.
        num_samples: length T of the original audio, or None if not known when the header is written.
        num_frames: frames F = ceil(T / hop_length), or None together with `num_samples`.
        version: the format version written (1 or 2).
    """

    model_id: str | None
    weights_hash: bytes
    sample_rate: int | None
    hop_length: int
    n_stages: int
    stage_bits: tuple[int, ...]
    num_samples: int | None = None
    num_frames: int | None = None
    version: int = VERSION

    def __post_init__(self) -> None:
        version = _int("version", self.version)
        if version not in VERSIONS:
            raise TokFormatError(f"unsupported token file version {version} (this reader knows 1 and 2)")
        object.__setattr__(self, "version", version)
        if self.model_id is not None or version == 1:
            self._check_model_id()
        sizes = (8,) if version == 1 else (4, 8)
        if not isinstance(self.weights_hash, (bytes, bytearray)) or len(self.weights_hash) not in sizes:
            raise TokFormatError(
                f"weights_hash must be {' or '.join(map(str, sizes))} bytes (the first bytes of the weights sha256)"
            )
        object.__setattr__(self, "weights_hash", bytes(self.weights_hash))
        if self.sample_rate is None and version == 1:
            raise TokFormatError("a version-1 header needs the sample rate")
        limits = {
            "sample_rate": MAX_SAMPLE_RATE,
            "hop_length": MAX_HOP_LENGTH if version == 1 else MAX_HOP_LENGTH_V2,
            "n_stages": MAX_STAGES,
        }
        for name, hi in limits.items():
            if name == "sample_rate" and self.sample_rate is None:
                continue
            value = _int(name, getattr(self, name))
            if not 1 <= value <= hi:
                raise TokFormatError(f"{name} {value} out of range [1, {hi}]")
            object.__setattr__(self, name, value)
        self._check_stage_bits()
        if (self.num_samples is None) != (self.num_frames is None):
            raise TokFormatError("num_samples and num_frames must both be given or both be None")
        if self.num_samples is not None:
            samples, frames = _int("num_samples", self.num_samples), _int("num_frames", self.num_frames)
            if samples >= 2**64:
                raise TokFormatError(f"num_samples {samples} does not fit in 64 bits")
            _check_counts(samples, frames, self.hop_length)
            object.__setattr__(self, "num_samples", samples)
            object.__setattr__(self, "num_frames", frames)

    def _check_model_id(self) -> None:
        if not isinstance(self.model_id, str):
            raise TokFormatError(f"model_id must be a str, got {type(self.model_id).__name__}")
        try:
            n_id = len(self.model_id.encode("utf-8"))
        except UnicodeEncodeError:
            raise TokFormatError("model_id cannot be encoded as UTF-8 (lone surrogate)") from None
        if not 1 <= n_id <= MAX_MODEL_ID_BYTES:
            raise TokFormatError(f"model_id must be 1..{MAX_MODEL_ID_BYTES} UTF-8 bytes, got {n_id}")

    def _check_stage_bits(self) -> None:
        given = self.stage_bits
        if isinstance(given, (int, np.integer)) and not isinstance(given, bool):
            given = (given,) * self.n_stages
        if not isinstance(given, (tuple, list)):
            raise TokFormatError(f"stage_bits must be an int or one int per stage, got {type(given).__name__}")
        bits = tuple(_int("stage_bits", b) for b in given)
        if len(bits) != self.n_stages:
            raise TokFormatError(f"stage_bits has {len(bits)} widths for {self.n_stages} stages")
        if bad := [b for b in bits if not 1 <= b <= MAX_BITS]:
            raise TokFormatError(f"bits per code {bad[0]} out of range [1, {MAX_BITS}]")
        if self.version == 1 and len(set(bits)) > 1:
            raise TokFormatError(f"version 1 holds one width for every stage, got {bits_text(bits)}")
        if self.version == 2 and _widths_word(bits) is None:
            raise TokFormatError(
                f"version 2 holds a width for each of stages 1-{EXPLICIT_WIDTHS} and one for "
                f"the rest, got {bits_text(bits)}"
            )
        object.__setattr__(self, "stage_bits", bits)

    @property
    def known_length(self) -> bool:
        return self.num_frames is not None

    @property
    def counts_in_trailer(self) -> bool:
        """Whether the file carries the counts after the codes: unknown when the header was written, or (version
        2) too many samples for the header's 32 bits."""
        return not self.known_length or (self.version == 2 and self.num_samples > MAX_SAMPLES_V2_HEADER)

    @property
    def frame_rate(self) -> float | None:
        return None if self.sample_rate is None else self.sample_rate / self.hop_length

    @property
    def bits_per_code(self) -> int | None:
        """The width of every code when all stages share one, else None (see `stage_bits`)."""
        return shared_width(self.stage_bits)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(1 << b for b in self.stage_bits)

    @property
    def frame_bits(self) -> int:
        """Bits of one frame of codes: the sum of `stage_bits`."""
        return sum(self.stage_bits)

    @property
    def nominal_bitrate(self) -> float | None:
        """Bits per second of the codes alone: frame_bits * frame_rate (None without the sample rate)."""
        return None if self.sample_rate is None else self.frame_bits * self.frame_rate

    @property
    def header_bytes(self) -> int:
        """Bytes before the codes: 16 in version 2; the 8-byte prefix, 35 bytes and the model id in version 1."""
        if self.version == 2:
            return _HEADER_V2.size
        return _PREFIX.size + _FIXED.size + len(self.model_id.encode("utf-8"))

    @property
    def trailer_bytes(self) -> int:
        counts = (_COUNTS if self.version == 1 else _COUNTS_V2).size if self.counts_in_trailer else 0
        return _CRC.size + counts

    @property
    def payload_bytes(self) -> int | None:
        """ceil(F * frame_bits / 8), or None when the frame count is not known."""
        if self.num_frames is None:
            return None
        return -(-self.num_frames * self.frame_bits // 8)

    def file_bytes(self, num_frames: int | None = None) -> int:
        """Exact size of the file holding `num_frames` frames (default: the header's count)."""
        frames = self.num_frames if num_frames is None else num_frames
        if frames is None:
            raise TokFormatError("file_bytes needs num_frames for a header of unknown length")
        return self.header_bytes + -(-frames * self.frame_bits // 8) + self.trailer_bytes

    def made_with(self, sha256: str) -> bool:
        """Whether the weights whose hex sha256 is `sha256` made these codes (the one rule for model identity)."""
        return sha256.lower().startswith(self.weights_hash.hex())

    def encode(self) -> bytes:
        """The header bytes exactly as written at the start of the file."""
        trailer = self.counts_in_trailer
        if self.version == 2:
            layout = (self.n_stages - 1) | (V2_COUNTS_IN_TRAILER if trailer else 0)
            return _HEADER_V2.pack(
                MAGIC,
                2,
                layout,
                self.weights_hash[:4],
                self.hop_length,
                _widths_word(self.stage_bits),
                0 if trailer else self.num_samples,
            )
        model_id = self.model_id.encode("utf-8")
        fixed = _FIXED.pack(
            self.weights_hash,
            self.sample_rate,
            self.hop_length,
            self.n_stages,
            self.stage_bits[0],
            self.num_samples or 0,
            self.num_frames or 0,
            len(model_id),
        )
        flags = FLAG_COUNTS_IN_TRAILER if trailer else 0
        return _PREFIX.pack(MAGIC_V1, 1, flags, len(fixed) + len(model_id)) + fixed + model_id

    def trailer_counts(self, num_samples: int, num_frames: int) -> bytes:
        """The counts as the trailer of a file with `counts_in_trailer` holds them."""
        if self.version == 2:
            return _COUNTS_V2.pack(num_samples)
        return _COUNTS.pack(num_samples, num_frames)


def check_codes(header: TokHeader, codes: np.ndarray) -> None:
    """TokFormatError unless `codes` [S, n] are integers each within its stage's codebook, S = header.n_stages."""
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.shape[0] != header.n_stages:
        raise TokFormatError(f"codes must have shape [S={header.n_stages}, n], got {list(arr.shape)}")
    if arr.dtype.kind not in "iu":
        raise TokFormatError(f"codes must be integers, got dtype {arr.dtype}")
    if not arr.size:
        return
    lo, hi = arr.min(axis=1), arr.max(axis=1)
    sizes = np.array(header.codebook_sizes)
    for s in np.flatnonzero((lo < 0) | (hi >= sizes)):
        bits = header.stage_bits[s]
        where = "" if header.bits_per_code else f" in stage {s + 1}"
        raise TokFormatError(
            f"codes{where} must be in [0, {sizes[s]}) for {bits} bits, got [{int(lo[s])}, {int(hi[s])}]"
        )


# ---------------------------------------------------------------------------------------------- bits


def _frame_widths(bits: int | Sequence[int]) -> np.ndarray:
    return np.atleast_1d(np.asarray(bits, dtype=np.int64))


def pack_codes(
    values: np.ndarray, bits: int | Sequence[int], carry: np.ndarray | None = None
) -> tuple[bytes, np.ndarray]:
    """Pack values (flat, frame-major) LSB-first after `carry`; returns (whole bytes, the < 8 bits left).

    bits: the width of every value, or one width per stage: value k then has width bits[k % len(bits)] (and
    the number of values is a multiple of len(bits)); each value is < 2**width.
    """
    widths = _frame_widths(bits)
    v = np.ascontiguousarray(values, dtype="<u2").reshape(-1, widths.size)
    top = int(widths.max())
    planes = np.unpackbits(v.view(np.uint8).reshape(len(v), widths.size, 2), axis=2, count=top, bitorder="little")
    keep = np.arange(top) < widths[:, None]  # [S, top]: the low `width` bits of each stage's value
    stream = planes.reshape(-1) if keep.all() else planes[:, keep].reshape(-1)
    if carry is not None and carry.size:
        stream = np.concatenate([carry, stream])
    whole = stream.size // 8 * 8
    return np.packbits(stream[:whole], bitorder="little").tobytes(), stream[whole:].copy()


def unpack_codes(
    data: bytes, bits: int | Sequence[int], count: int, carry: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read `count` values (widths as in `pack_codes`) from `carry` then `data`; returns (uint16 [count],
    bits left)."""
    widths = _frame_widths(bits)
    r = 0 if carry is None else carry.size
    # Put the carried bits at the top of a byte before `data`, so the stream starts at bit offset 8 - r;
    # two zero bytes at the end let every value be read as a 3-byte window (16 bits + 7 of shift <= 24).
    lead = int(np.packbits(carry, bitorder="little")[0]) << (8 - r) & 0xFF if r else 0
    buf = np.empty(len(data) + 3, dtype=np.uint8)
    buf[0], buf[1:-2], buf[-2:] = lead, np.frombuffer(data, dtype=np.uint8), 0
    frames, frame_bits = count // widths.size, int(widths.sum())
    start, need = 8 - r, frames * frame_bits
    if count % widths.size or start + need > 8 * (len(data) + 1):  # internal: callers size `data`
        raise ValueError(f"need {need} bits for {count} values, have {r + 8 * len(data)}")
    first = np.concatenate([[0], np.cumsum(widths)[:-1]])  # each stage's bit offset within a frame
    offsets = (start + np.arange(frames, dtype=np.int64)[:, None] * frame_bits + first).reshape(-1)
    idx, shift = offsets >> 3, (offsets & 7).astype(np.uint32)
    window = buf[idx].astype(np.uint32) | buf[idx + 1].astype(np.uint32) << 8
    window |= buf[idx + 2].astype(np.uint32) << 16
    masks = np.tile(((1 << widths) - 1).astype(np.uint32), frames)
    values = ((window >> shift) & masks).astype(np.uint16)
    end = start + need
    return values, np.unpackbits(buf[end >> 3 : len(data) + 1], bitorder="little")[end & 7 :]


def _bytes_for(bits: int, carried: int) -> int:
    """Whole bytes to read so that `carried` bits plus them hold `bits` bits."""
    return max(0, -(-(bits - carried) // 8))


# ---------------------------------------------------------------------------------------------- write


class TokWriter:
    """Streams codes into a .tok file: the header at once, then frames as they come, in constant memory.

    Args:
        fileobj: a binary file object opened for writing (needs only `.write`; pipes are fine).
        header: the `TokHeader`; with `num_samples`/`num_frames` None the counts go in the trailer
            and `close(num_samples)` supplies them.
    """

    def __init__(self, fileobj: BinaryIO, header: TokHeader):
        if not isinstance(header, TokHeader):
            raise TypeError(f"header must be a TokHeader, got {type(header).__name__}")
        self.header = header
        self.num_frames = 0
        self.bytes_written = 0
        self._f = fileobj
        self._crc = 0
        self._carry = np.zeros(0, dtype=np.uint8)
        self._closed = False
        self._emit(header.encode())

    def _emit(self, data: bytes) -> None:
        if data:
            self._write_all(data)
            self._crc = zlib.crc32(data, self._crc)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # raw (unbuffered) files may accept only part of a write
            n = self._f.write(view)
            n = len(view) if n is None else n
            view = view[n:]
            self.bytes_written += n

    def write(self, codes) -> None:
        """Append frames. codes: [S, n] integers, stage s in [0, 2**stage_bits[s]), S = header.n_stages, n >= 0."""
        if self._closed:
            raise TokFormatError("write() after close()")
        h = self.header
        arr = np.asarray(codes)
        check_codes(h, arr)
        n = arr.shape[1]
        if h.known_length and self.num_frames + n > h.num_frames:
            raise TokFormatError(f"more frames than the header's num_frames {h.num_frames}")
        data, self._carry = pack_codes(arr.T, h.stage_bits, self._carry)  # frame-major
        self._emit(data)
        self.num_frames += n

    def close(self, num_samples: int | None = None) -> int:
        """Write the padding and the trailer; returns the file size in bytes. Does not close `fileobj`.

        num_samples: required when the header's counts are None; otherwise optional and checked.
        """
        if self._closed:
            raise TokFormatError("close() called twice")
        h = self.header
        if h.known_length:
            if self.num_frames != h.num_frames:
                raise TokFormatError(f"wrote {self.num_frames} frames, the header says {h.num_frames}")
            if num_samples is not None and _int("num_samples", num_samples) != h.num_samples:
                raise TokFormatError(f"num_samples {num_samples} differs from the header's {h.num_samples}")
            num_samples = h.num_samples
        else:
            if num_samples is None:
                raise TokFormatError("close(num_samples) is required when the header has no counts")
            num_samples = _int("num_samples", num_samples)
            if num_samples >= 2**64:
                raise TokFormatError(f"num_samples {num_samples} does not fit in 64 bits")
            _check_counts(num_samples, self.num_frames, h.hop_length)
        counts = h.trailer_counts(num_samples, self.num_frames) if h.counts_in_trailer else b""
        if self._carry.size:
            self._emit(np.packbits(self._carry, bitorder="little").tobytes())  # zero-padded last byte
            self._carry = self._carry[:0]
        self._emit(counts)
        self._write_all(_CRC.pack(self._crc))
        self._closed = True
        return self.bytes_written

    def __enter__(self) -> "TokWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()


def write_tok(fileobj: BinaryIO | str | os.PathLike, header: TokHeader, codes, num_samples: int | None = None) -> int:
    """Write a whole .tok file of codes [S, F]; returns its size in bytes.

    num_samples: only for a header without counts (writes the trailer form); otherwise the header's counts
    must match `codes`.
    """
    if isinstance(fileobj, (str, os.PathLike)):
        with open(fileobj, "wb") as f:
            return write_tok(f, header, codes, num_samples)
    codes = np.asarray(codes)
    writer = TokWriter(fileobj, header)
    if codes.ndim != 2:
        writer.write(codes)  # raises the shape error
    for start in range(0, max(codes.shape[1], 1), _WRITE_BLOCK):  # bounds the packing temporaries
        writer.write(codes[:, start : start + _WRITE_BLOCK])
    return writer.close(num_samples)


# ---------------------------------------------------------------------------------------------- read


class TokReader:
    """Reads a .tok file of either version: `.header` at once, then iteration over [S, n] blocks of at most
    `block_frames`. Parsing needs no model: the header gives the stage widths and the counts.

    The CRC and the counts are verified when the last block has been read; a mismatch raises
    `TokFormatError` from the iteration (blocks already yielded are then unverified). For a file whose
    counts were unknown at header time, `.header` gets them once iteration finishes.

    Args:
        fileobj: a binary file object opened for reading (needs only `.read`; pipes are fine).
        block_frames: the most frames per yielded block.
        dtype: dtype of the yielded blocks (int64 by default, as the model's `decode` takes).
        max_frames: if given, a file with more frames raises `TokFormatError` (from the header when it
            has the count, else as soon as decoding passes the limit): bounds what an upload can cost.
    """

    def __init__(self, fileobj: BinaryIO, block_frames: int = 4096, dtype=np.int64, max_frames: int | None = None):
        if block_frames < 1:
            raise ValueError("block_frames must be >= 1")
        self.block_frames = int(block_frames)
        self.max_frames = max_frames
        self.dtype = np.dtype(dtype)
        self.num_frames = 0  # frames yielded so far
        self.bytes_read = 0
        self._f = fileobj
        self._crc = 0
        self._started = False
        self.header = self._read_header()
        if max_frames is not None and self.header.known_length:
            self._check_limit(self.header.num_frames)

    def _read(self, n: int) -> bytes:
        """Read up to n bytes, looping over short reads; fewer only at end of file."""
        parts, got = [], 0
        while got < n:
            chunk = self._f.read(min(n - got, _READ_CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self.bytes_read += len(data)
        return data

    def _truncated(self, expected: int, at_least: bool = False) -> TokFormatError:
        qualifier = "at least " if at_least else ""
        return TokFormatError(f"truncated token file: expected {qualifier}{expected} bytes, got {self.bytes_read}")

    def _read_header(self) -> TokHeader:
        start = self._read(3)
        if len(start) < 3 or start[:2] != MAGIC:
            if start and (MAGIC_V1.startswith(start) or (MAGIC + bytes([VERSION])).startswith(start)):
                raise self._truncated(_MIN_FILE_V2, at_least=True)
            raise TokFormatError("not a SimVQ token file (bad magic bytes)")
        if start[2] == MAGIC_V1[2]:
            return self._read_header_v1(start)
        if start[2] == VERSION:
            return self._read_header_v2(start)
        if start[2] < 0x20:  # a later version; a printable byte is another kind of file
            raise TokFormatError(f"unsupported token file version {start[2]} (this reader knows 1 and 2)")
        raise TokFormatError("not a SimVQ token file (bad magic bytes)")

    def _read_header_v2(self, start: bytes) -> TokHeader:
        data = start + self._read(_HEADER_V2.size - len(start))
        if len(data) < _HEADER_V2.size:
            raise self._truncated(_MIN_FILE_V2, at_least=True)
        _, version, layout, hash4, hop, widths, samples = _HEADER_V2.unpack(data)
        if layout & V2_RESERVED:
            raise TokFormatError(f"unknown flags 0x{layout & V2_RESERVED:02x} in token file header")
        stages = (layout & 0x3F) + 1
        streamed = bool(layout & V2_COUNTS_IN_TRAILER)
        if streamed and samples:
            raise TokFormatError("header counts must be 0 when the counts-in-trailer flag is set")
        bits = _stage_bits_of_word(widths, stages)
        frames = -(-samples // hop) if hop else 0  # hop 0 is refused by TokHeader
        self._crc = zlib.crc32(data)
        return TokHeader(
            None,
            hash4,
            None,
            hop,
            stages,
            bits,
            None if streamed else samples,
            None if streamed else frames,
            version=version,
        )

    def _read_header_v1(self, start: bytes) -> TokHeader:
        prefix = start + self._read(_PREFIX.size - len(start))
        if prefix[:4] != MAGIC_V1[: len(prefix[:4])]:
            raise TokFormatError("not a SimVQ token file (bad magic bytes)")
        if len(prefix) < _PREFIX.size:
            raise self._truncated(_PREFIX.size + MIN_HEADER_LENGTH, at_least=True)
        _, version, flags, length = _PREFIX.unpack(prefix)
        if version != 1:
            raise TokFormatError(
                f"unsupported token file version {version} after {MAGIC_V1.decode()} (such a "
                "file is version 1; version 2 starts SV 02)"
            )
        if flags & ~KNOWN_FLAGS:
            raise TokFormatError(f"unknown flags 0x{flags:02x} in token file header")
        if not MIN_HEADER_LENGTH <= length <= MAX_HEADER_LENGTH:
            raise TokFormatError(f"header length {length} out of range [{MIN_HEADER_LENGTH}, {MAX_HEADER_LENGTH}]")
        body = self._read(length)
        if len(body) < length:
            raise self._truncated(_PREFIX.size + length, at_least=True)
        hash8, sr, hop, stages, bits, samples, frames, id_len = _FIXED.unpack_from(body)
        if _FIXED.size + id_len != length:
            raise TokFormatError(f"header length {length} does not match the model id length {id_len}")
        try:
            model_id = body[_FIXED.size :].decode("utf-8")
        except UnicodeDecodeError:
            raise TokFormatError("model id in the token file header is not valid UTF-8") from None
        streamed = bool(flags & FLAG_COUNTS_IN_TRAILER)
        if streamed and (samples or frames):
            raise TokFormatError("header counts must be 0 when the counts-in-trailer flag is set")
        self._crc = zlib.crc32(prefix + body)
        return TokHeader(
            model_id,
            hash8,
            sr,
            hop,
            stages,
            bits,
            None if streamed else samples,
            None if streamed else frames,
            version=1,
        )

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._started:
            raise TokFormatError("a TokReader can be iterated only once")
        self._started = True
        return self._blocks_known() if self.header.known_length else self._blocks_streamed()

    def _check_limit(self, frames: int) -> None:
        if self.max_frames is not None and frames > self.max_frames:
            raise TokFormatError(f"token file has more than {self.max_frames} frames (the limit)")

    def _emit(self, values: np.ndarray, n: int) -> np.ndarray:
        self.num_frames += n
        self._check_limit(self.num_frames)
        block = values.reshape(n, self.header.n_stages).T
        return np.ascontiguousarray(block, dtype=self.dtype)

    def _check_padding(self, carry: np.ndarray) -> None:
        if carry.any():
            raise TokFormatError("non-zero padding bits after the last code")

    def _check_crc(self, stored: bytes) -> None:
        (crc,) = _CRC.unpack(stored)
        if crc != self._crc:
            raise TokFormatError(f"CRC32 mismatch: file says {crc:08x}, contents give {self._crc:08x}")

    def _blocks_known(self) -> Iterator[np.ndarray]:
        h = self.header
        bits, width = h.stage_bits, h.n_stages
        total = h.file_bytes()
        carry = np.zeros(0, dtype=np.uint8)
        last = None
        while self.num_frames < h.num_frames:
            n = min(self.block_frames, h.num_frames - self.num_frames)
            need = _bytes_for(n * h.frame_bits, carry.size)
            data = self._read(need)
            if len(data) < need:
                raise self._truncated(total)
            self._crc = zlib.crc32(data, self._crc)
            values, carry = unpack_codes(data, bits, n * width, carry)
            if self.num_frames + n == h.num_frames:
                last = (values, n)  # handed out only once the file has been verified
                break
            yield self._emit(values, n)
        self._check_padding(carry)
        stored = self._read(_CRC.size)
        if len(stored) < _CRC.size:
            raise self._truncated(total)
        self._check_crc(stored)
        if self._f.read(1):
            raise TokFormatError(f"trailing bytes after the end of the token file ({total} bytes)")
        if last is not None:
            yield self._emit(*last)

    def _blocks_streamed(self) -> Iterator[np.ndarray]:
        h = self.header
        bits, width, frame_bits = h.stage_bits, h.n_stages, h.frame_bits
        tail = h.trailer_bytes
        hold = tail + 1  # the trailer and the last code byte, which may hold padding
        buf = bytearray()
        carry = np.zeros(0, dtype=np.uint8)
        payload_seen = 0  # payload bytes consumed from buf
        eof = False
        while not eof:
            chunk = self._read(_READ_CHUNK)
            eof = not chunk
            buf += chunk
            while True:  # decode whole frames that lie entirely before the held-back bytes
                usable = len(buf) - hold
                n = min(self.block_frames, (usable * 8 + carry.size) // frame_bits) if usable > 0 else 0
                if n <= 0:
                    break
                need = _bytes_for(n * frame_bits, carry.size)
                data = bytes(buf[:need])
                del buf[:need]
                payload_seen += need
                self._crc = zlib.crc32(data, self._crc)
                values, carry = unpack_codes(data, bits, n * width, carry)
                yield self._emit(values, n)
        if len(buf) < tail:
            raise self._truncated(self.bytes_read - len(buf) + tail, at_least=True)
        rest, counts, stored = bytes(buf[:-tail]), bytes(buf[-tail : -_CRC.size]), bytes(buf[-_CRC.size :])
        if h.version == 1:
            num_samples, num_frames = _COUNTS.unpack(counts)
        else:
            (num_samples,) = _COUNTS_V2.unpack(counts)
            num_frames = -(-num_samples // h.hop_length)
        try:
            _check_counts(num_samples, num_frames, h.hop_length)
        except TokFormatError as e:
            raise TokFormatError(f"bad trailer (corrupt, or bytes after the end of the file): {e}") from None
        payload = -(-num_frames * frame_bits // 8)
        found = payload_seen + len(rest)
        if found < payload:
            expected = h.header_bytes + payload + tail
            raise TokFormatError(f"truncated token file: expected {expected} bytes, got {self.bytes_read}")
        if found > payload or self.num_frames > num_frames:
            raise TokFormatError(
                f"{found - payload} unexpected bytes: bytes after the end of the file or a corrupt trailer"
            )
        n = num_frames - self.num_frames
        self._crc = zlib.crc32(rest, self._crc)
        if n:
            values, carry = unpack_codes(rest, bits, n * width, carry)
            self._check_padding(carry)
            self._crc = zlib.crc32(counts, self._crc)
            self._check_crc(stored)  # verify before handing out the final block
            self.header = dataclasses.replace(h, num_samples=num_samples, num_frames=num_frames)
            yield self._emit(values, n)
        else:
            tail_bits = np.unpackbits(np.frombuffer(rest, dtype=np.uint8), bitorder="little")
            self._check_padding(np.concatenate([carry, tail_bits]))
            self._crc = zlib.crc32(counts, self._crc)
            self._check_crc(stored)
            self.header = dataclasses.replace(h, num_samples=num_samples, num_frames=num_frames)


def read_tok(
    fileobj: BinaryIO | str | os.PathLike, dtype=np.int64, max_frames: int | None = None
) -> tuple[TokHeader, np.ndarray]:
    """Read and verify a whole .tok file; returns (header with counts filled in, codes [S, F])."""
    if isinstance(fileobj, (str, os.PathLike)):
        with open(fileobj, "rb") as f:
            return read_tok(f, dtype, max_frames)
    reader = TokReader(fileobj, block_frames=65536, dtype=dtype, max_frames=max_frames)
    blocks = list(reader)
    codes = np.concatenate(blocks, axis=1) if blocks else np.zeros((reader.header.n_stages, 0), dtype=reader.dtype)
    return reader.header, codes
