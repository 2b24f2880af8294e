"""The .tok container: bit-packed codec tokens with a checked header and a CRC32 (docs/token-file.md)."""

from __future__ import annotations

import dataclasses
import operator
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from codec.errors import TokFormatError

MAGIC = b"SVQT"
VERSION = 1
FLAG_COUNTS_IN_TRAILER = 0x01  # num_samples/num_frames were unknown at header time: they follow the codes
KNOWN_FLAGS = FLAG_COUNTS_IN_TRAILER

MAX_SAMPLE_RATE = 384_000
MAX_HOP_LENGTH = 2**32 - 1
MAX_STAGES = 64
MAX_BITS = 16
MAX_FRAMES = 10**10
MAX_MODEL_ID_BYTES = 255

_PREFIX = struct.Struct("<4sBBH")  # magic, version, flags, header length (bytes after this prefix)
_FIXED = struct.Struct("<8sIIBBQQB")  # weights hash, sr, hop, stages, bits, samples, frames, model id length
_COUNTS = struct.Struct("<QQ")  # num_samples, num_frames (the trailer of a streamed file)
_CRC = struct.Struct("<I")
MIN_HEADER_LENGTH = _FIXED.size + 1
MAX_HEADER_LENGTH = _FIXED.size + MAX_MODEL_ID_BYTES

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


@dataclass(frozen=True)
class TokHeader:
    """What a .tok file says about its codes; every field is range-checked on construction.

    Args:
        model_id: the preset id of the model that made (and can decode) the codes, 1..255 UTF-8 bytes.
        weights_hash: the first 8 bytes of that model's weights sha256.
        sample_rate: Hz of the audio, 1..384000.
        hop_length: samples per frame; the frame rate is `sample_rate / hop_length`.
        n_stages: residual stages S stored per frame, 1..64.
        bits_per_code: log2(codebook size), 1..16.
        num_samples: length T of the original audio, or None if not known when the header is written.
        num_frames: frames F = ceil(T / hop_length), or None together with `num_samples`.
    """

    model_id: str
    weights_hash: bytes
    sample_rate: int
    hop_length: int
    n_stages: int
    bits_per_code: int
    num_samples: int | None = None
    num_frames: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str):
            raise TokFormatError(f"model_id must be a str, got {type(self.model_id).__name__}")
        try:
            n_id = len(self.model_id.encode("utf-8"))
        except UnicodeEncodeError:
            raise TokFormatError("model_id cannot be encoded as UTF-8 (lone surrogate)") from None
        if not 1 <= n_id <= MAX_MODEL_ID_BYTES:
            raise TokFormatError(f"model_id must be 1..{MAX_MODEL_ID_BYTES} UTF-8 bytes, got {n_id}")
        if not isinstance(self.weights_hash, (bytes, bytearray)) or len(self.weights_hash) != 8:
            raise TokFormatError("weights_hash must be 8 bytes (the first 8 bytes of the weights sha256)")
        object.__setattr__(self, "weights_hash", bytes(self.weights_hash))
        limits = {
            "sample_rate": MAX_SAMPLE_RATE,
            "hop_length": MAX_HOP_LENGTH,
            "n_stages": MAX_STAGES,
            "bits_per_code": MAX_BITS,
        }
        for name, hi in limits.items():
            value = _int(name, getattr(self, name))
            if not 1 <= value <= hi:
                raise TokFormatError(f"{name} {value} out of range [1, {hi}]")
            object.__setattr__(self, name, value)
        if (self.num_samples is None) != (self.num_frames is None):
            raise TokFormatError("num_samples and num_frames must both be given or both be None")
        if self.num_samples is not None:
            samples, frames = _int("num_samples", self.num_samples), _int("num_frames", self.num_frames)
            if samples >= 2**64:
                raise TokFormatError(f"num_samples {samples} does not fit in 64 bits")
            _check_counts(samples, frames, self.hop_length)
            object.__setattr__(self, "num_samples", samples)
            object.__setattr__(self, "num_frames", frames)

    @property
    def known_length(self) -> bool:
        return self.num_frames is not None

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def codebook_size(self) -> int:
        return 1 << self.bits_per_code

    @property
    def nominal_bitrate(self) -> float:
        """Bits per second of the codes alone: n_stages * bits_per_code * frame_rate."""
        return self.n_stages * self.bits_per_code * self.frame_rate

    @property
    def header_bytes(self) -> int:
        """Bytes before the codes: the 8-byte prefix and the header."""
        return _PREFIX.size + _FIXED.size + len(self.model_id.encode("utf-8"))

    @property
    def trailer_bytes(self) -> int:
        return _CRC.size + (0 if self.known_length else _COUNTS.size)

    @property
    def payload_bytes(self) -> int | None:
        """ceil(F * S * bits / 8), or None when the frame count is not known."""
        if self.num_frames is None:
            return None
        return -(-self.num_frames * self.n_stages * self.bits_per_code // 8)

    def file_bytes(self, num_frames: int | None = None) -> int:
        """Exact size of the file holding `num_frames` frames (default: the header's count)."""
        frames = self.num_frames if num_frames is None else num_frames
        if frames is None:
            raise TokFormatError("file_bytes needs num_frames for a header of unknown length")
        trailer = self.trailer_bytes
        return self.header_bytes + -(-frames * self.n_stages * self.bits_per_code // 8) + trailer

    def encode(self) -> bytes:
        """The prefix and header bytes exactly as written at the start of the file."""
        model_id = self.model_id.encode("utf-8")
        flags = 0 if self.known_length else FLAG_COUNTS_IN_TRAILER
        fixed = _FIXED.pack(
            self.weights_hash, self.sample_rate, self.hop_length, self.n_stages, self.bits_per_code,
            self.num_samples or 0, self.num_frames or 0, len(model_id),
        )
        return _PREFIX.pack(MAGIC, VERSION, flags, len(fixed) + len(model_id)) + fixed + model_id


# ---------------------------------------------------------------------------------------------- bits


def pack_codes(values: np.ndarray, bits: int, carry: np.ndarray | None = None) -> tuple[bytes, np.ndarray]:
    """Pack values (flat, each < 2**bits) LSB-first after `carry`; returns (whole bytes, the < 8 bits left)."""
    v = np.ascontiguousarray(values, dtype="<u2").reshape(-1)
    stream = np.unpackbits(v.view(np.uint8).reshape(-1, 2), axis=1, count=bits, bitorder="little").reshape(-1)
    if carry is not None and carry.size:
        stream = np.concatenate([carry, stream])
    whole = stream.size // 8 * 8
    return np.packbits(stream[:whole], bitorder="little").tobytes(), stream[whole:].copy()


def unpack_codes(data: bytes, bits: int, count: int, carry: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Read `count` values of `bits` bits from `carry` then `data`; returns (uint16 [count], bits left)."""
    r = 0 if carry is None else carry.size
    # Put the carried bits at the top of a byte before `data`, so the stream starts at bit offset 8 - r;
    # two zero bytes at the end let every value be read as a 3-byte window (16 bits + 7 of shift <= 24).
    lead = int(np.packbits(carry, bitorder="little")[0]) << (8 - r) & 0xFF if r else 0
    buf = np.empty(len(data) + 3, dtype=np.uint8)
    buf[0], buf[1:-2], buf[-2:] = lead, np.frombuffer(data, dtype=np.uint8), 0
    start, need = 8 - r, count * bits
    if start + need > 8 * (len(data) + 1):
        raise ValueError(f"need {need} bits, have {r + 8 * len(data)}")  # internal: callers size `data`
    offsets = start + np.arange(count, dtype=np.int64) * bits
    idx, shift = offsets >> 3, (offsets & 7).astype(np.uint32)
    window = buf[idx].astype(np.uint32) | buf[idx + 1].astype(np.uint32) << 8
    window |= buf[idx + 2].astype(np.uint32) << 16
    values = ((window >> shift) & ((1 << bits) - 1)).astype(np.uint16)
    end = start + need
    return values, np.unpackbits(buf[end >> 3: len(data) + 1], bitorder="little")[end & 7:]


def _bytes_for(count: int, bits: int, carried: int) -> int:
    """Whole bytes to read so that `carried` bits plus them hold `count` values."""
    return max(0, -(-(count * bits - carried) // 8))


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
        """Append frames. codes: [S, n] integers in [0, 2**bits_per_code), S = header.n_stages, n >= 0."""
        if self._closed:
            raise TokFormatError("write() after close()")
        h = self.header
        arr = np.asarray(codes)
        if arr.ndim != 2 or arr.shape[0] != h.n_stages:
            raise TokFormatError(f"codes must have shape [S={h.n_stages}, n], got {list(arr.shape)}")
        if arr.dtype.kind not in "iu":
            raise TokFormatError(f"codes must be integers, got dtype {arr.dtype}")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= h.codebook_size:
                raise TokFormatError(
                    f"codes must be in [0, {h.codebook_size}) for {h.bits_per_code} bits, got [{lo}, {hi}]")
        n = arr.shape[1]
        if h.known_length and self.num_frames + n > h.num_frames:
            raise TokFormatError(f"more frames than the header's num_frames {h.num_frames}")
        data, self._carry = pack_codes(arr.T, h.bits_per_code, self._carry)  # frame-major
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
            counts = b""
        else:
            if num_samples is None:
                raise TokFormatError("close(num_samples) is required when the header has no counts")
            num_samples = _int("num_samples", num_samples)
            if num_samples >= 2**64:
                raise TokFormatError(f"num_samples {num_samples} does not fit in 64 bits")
            _check_counts(num_samples, self.num_frames, h.hop_length)
            counts = _COUNTS.pack(num_samples, self.num_frames)
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


def write_tok(fileobj: BinaryIO | str | os.PathLike, header: TokHeader, codes,
              num_samples: int | None = None) -> int:
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
        writer.write(codes[:, start:start + _WRITE_BLOCK])
    return writer.close(num_samples)


# ---------------------------------------------------------------------------------------------- read


class TokReader:
    """Reads a .tok file: `.header` at once, then iteration over [S, n] blocks of at most `block_frames`.

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
        prefix = self._read(_PREFIX.size)
        if prefix[:4] != MAGIC[: len(prefix[:4])] or not prefix:
            raise TokFormatError("not a SimVQ token file (bad magic bytes)")
        if len(prefix) < _PREFIX.size:
            raise self._truncated(_PREFIX.size + MIN_HEADER_LENGTH, at_least=True)
        _, version, flags, length = _PREFIX.unpack(prefix)
        if version != VERSION:
            raise TokFormatError(f"unsupported token file version {version} (this reader knows {VERSION})")
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
            model_id = body[_FIXED.size:].decode("utf-8")
        except UnicodeDecodeError:
            raise TokFormatError("model id in the token file header is not valid UTF-8") from None
        streamed = bool(flags & FLAG_COUNTS_IN_TRAILER)
        if streamed and (samples or frames):
            raise TokFormatError("header counts must be 0 when the counts-in-trailer flag is set")
        self._crc = zlib.crc32(prefix + body)
        return TokHeader(model_id, hash8, sr, hop, stages, bits,
                         None if streamed else samples, None if streamed else frames)

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
        bits, width = h.bits_per_code, h.n_stages
        total = h.file_bytes()
        carry = np.zeros(0, dtype=np.uint8)
        last = None
        while self.num_frames < h.num_frames:
            n = min(self.block_frames, h.num_frames - self.num_frames)
            need = _bytes_for(n * width, bits, carry.size)
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
        bits, width = h.bits_per_code, h.n_stages
        frame_bits = bits * width
        tail = _COUNTS.size + _CRC.size
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
                need = _bytes_for(n * width, bits, carry.size)
                data = bytes(buf[:need])
                del buf[:need]
                payload_seen += need
                self._crc = zlib.crc32(data, self._crc)
                values, carry = unpack_codes(data, bits, n * width, carry)
                yield self._emit(values, n)
        if len(buf) < tail:
            raise self._truncated(self.bytes_read - len(buf) + tail, at_least=True)
        rest, counts, stored = bytes(buf[:-tail]), bytes(buf[-tail:-_CRC.size]), bytes(buf[-_CRC.size:])
        num_samples, num_frames = _COUNTS.unpack(counts)
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
                f"{found - payload} unexpected bytes: bytes after the end of the file or a corrupt trailer")
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


def read_tok(fileobj: BinaryIO | str | os.PathLike, dtype=np.int64, max_frames: int | None = None
             ) -> tuple[TokHeader, np.ndarray]:
    """Read and verify a whole .tok file; returns (header with counts filled in, codes [S, F])."""
    if isinstance(fileobj, (str, os.PathLike)):
        with open(fileobj, "rb") as f:
            return read_tok(f, dtype, max_frames)
    reader = TokReader(fileobj, block_frames=65536, dtype=dtype, max_frames=max_frames)
    blocks = list(reader)
    codes = (np.concatenate(blocks, axis=1) if blocks
             else np.zeros((reader.header.n_stages, 0), dtype=reader.dtype))
    return reader.header, codes
