"""Tests for the .tok container: layout, bit-packing, streaming, and rejection of malformed files."""

import io
import os
import struct
import threading
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec.errors import TokFormatError
from codec.tokfile import TokHeader, TokReader, TokWriter, pack_codes, read_tok, unpack_codes, write_tok

HASH = bytes.fromhex("0123456789abcdef")


def header(stages=3, bits=10, frames=7, hop=320, samples=None, model_id="simvq-16k", known=True, version=2):
    if not known:
        return TokHeader(model_id, HASH, 16000, hop, stages, bits, version=version)
    samples = frames * hop - (hop // 3 if frames else 0) if samples is None else samples
    return TokHeader(model_id, HASH, 16000, hop, stages, bits, num_samples=samples, num_frames=frames, version=version)


def random_codes(rng, stages, bits, frames):
    """Codes [S, F] within each stage's codebook; bits: one width, or one per stage."""
    high = np.broadcast_to(1 << np.asarray(bits), (stages,))[:, None]
    return rng.integers(0, high, size=(stages, frames), dtype=np.int64)


def tok_bytes(h, codes, num_samples=None):
    buf = io.BytesIO()
    write_tok(buf, h, codes, num_samples=num_samples)
    return buf.getvalue()


def read_bytes(data, **kw):
    return read_tok(io.BytesIO(data), **kw)


def raw_file(
    sr=16000,
    hop=320,
    stages=2,
    bits=4,
    samples=640,
    frames=2,
    model_id=b"m",
    flags=0,
    version=1,
    magic=b"SVQT",
    payload=None,
    trailer_counts=None,
    header_len=None,
):
    """Builds a version-1 file straight from the documented byte layout, bypassing TokHeader's checks."""
    fixed = struct.pack("<8sIIBBQQB", HASH, sr, hop, stages, bits, samples, frames, len(model_id)) + model_id
    length = len(fixed) if header_len is None else header_len
    head = struct.pack("<4sBBH", magic, version, flags, length) + fixed
    if payload is None:
        payload = bytes(-(-(trailer_counts[1] if trailer_counts else frames) * stages * bits // 8))
    body = head + payload + (struct.pack("<QQ", *trailer_counts) if trailer_counts else b"")
    return body + struct.pack("<I", zlib.crc32(body))


def raw_v2(
    hop=320,
    layout=1,
    widths=0x33,
    samples=640,
    version=2,
    magic=b"SV",
    payload=None,
    trailer_samples=None,
    frame_bits=8,
):
    """Builds a version-2 file straight from the documented byte layout (default: 2 stages x 4 bits, 2 frames)."""
    head = struct.pack("<2sBB4sHHI", magic, version, layout, HASH[:4], hop, widths, samples)
    if payload is None:
        frames = -(-(samples if trailer_samples is None else trailer_samples) // hop)
        payload = bytes(-(-frames * frame_bits // 8))
    body = head + payload + (b"" if trailer_samples is None else struct.pack("<Q", trailer_samples))
    return body + struct.pack("<I", zlib.crc32(body))


class NoSeek(io.RawIOBase):
    """A read-only stream without seek/tell that returns short reads of 1..13 bytes."""

    def __init__(self, data, seed=0):
        self._data, self._pos, self._rng = data, 0, np.random.default_rng(seed)

    def readable(self):
        return True

    def read(self, n=-1):
        n = int(self._rng.integers(1, 14)) if n < 0 else min(n, int(self._rng.integers(1, 14)))
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


# ------------------------------------------------------------------------------ layout and sizes


def test_layout_matches_docs_worked_example():
    h = TokHeader("simvq-16k", HASH, 16000, 320, 2, 3, num_samples=600, num_frames=2)
    data = tok_bytes(h, np.array([[5, 6], [3, 1]]))
    assert data[:16] == bytes.fromhex("53 56 02 01 01 23 45 67 40 01 22 00 58 02 00 00")
    assert struct.unpack_from("<2sBB4sHHI", data) == (b"SV", 2, 1, HASH[:4], 320, 0x0022, 600)
    assert data[16:18] == bytes([0x9D, 0x03])  # 5 + 3<<3 + 6<<6 + 1<<9 = 0x39D, little-endian
    assert data[18:] == struct.pack("<I", zlib.crc32(data[:18]))
    assert len(data) == h.file_bytes() == 22


def test_per_stage_widths_worked_example():
    h = TokHeader("m", HASH, 16000, 320, 3, (5, 3, 2), num_samples=640, num_frames=2)
    data = tok_bytes(h, np.array([[17, 30], [6, 1], [2, 3]]))
    assert data[10:12] == bytes([0x24, 0x01])  # nibbles 4, 2, 1 (b - 1), then 0: no fourth stage
    # frame 0 is 17 | 6<<5 | 2<<8, frame 1 starts at bit 10: 30<<10 | 1<<15 | 3<<18
    value = 17 + (6 << 5) + (2 << 8) + (30 << 10) + (1 << 15) + (3 << 18)
    assert data[16:19] == value.to_bytes(3, "little") == bytes([0xD1, 0xFA, 0x0C])
    assert len(data) == 16 + 3 + 4 == h.file_bytes()
    got_h, got = read_bytes(data)
    assert got.tolist() == [[17, 30], [6, 1], [2, 3]] and got_h.stage_bits == (5, 3, 2)


def test_version_1_layout_matches_docs_worked_example():
    h = header(stages=2, bits=3, frames=2, samples=600, version=1)
    data = tok_bytes(h, np.array([[5, 6], [3, 1]]))
    assert data[:8] == b"SVQT\x01\x00" + struct.pack("<H", 35 + 9)
    assert struct.unpack_from("<8sIIBBQQB", data, 8) == (HASH, 16000, 320, 2, 3, 600, 2, 9)
    assert data[42] == 9 and data[43:52] == b"simvq-16k"
    assert data[52:54] == bytes([0x9D, 0x03])
    assert data[54:] == struct.pack("<I", zlib.crc32(data[:54]))
    assert len(data) == h.file_bytes() == 58
    got_h, _ = read_bytes(data)
    assert (got_h.version, got_h.model_id, got_h.weights_hash, got_h.sample_rate) == (1, "simvq-16k", HASH, 16000)
    assert got_h.stage_bits == (3, 3)


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_every_bit_width_and_exact_size(bits):
    rng = np.random.default_rng(bits)
    for known, version in ((True, 2), (False, 2), (True, 1), (False, 1)):
        stages, frames = int(rng.integers(1, 20)), int(rng.integers(0, 60))
        codes = random_codes(rng, stages, bits, frames)
        codes[:, :1] = (1 << bits) - 1  # extremes are representable
        h = header(stages, bits, frames, known=known, version=version)
        samples = frames * 320 if not known else None
        data = tok_bytes(h, codes, num_samples=samples)
        fixed = 16 if version == 2 else 8 + 35 + len("simvq-16k")
        trailer = 4 if known else (12 if version == 2 else 20)
        assert len(data) == fixed + -(-frames * stages * bits // 8) + trailer
        got_h, got = read_bytes(data)
        np.testing.assert_array_equal(got, codes)
        assert got.dtype == np.int64 and got.shape == (stages, frames)
        assert got_h.num_frames == frames and got_h.num_samples == (samples if not known else h.num_samples)
        assert got_h.version == version and got_h.stage_bits == (bits,) * stages == h.stage_bits
        assert got_h.weights_hash == HASH[: 4 if version == 2 else 8]
        assert (got_h.model_id, got_h.sample_rate) == ((None, None) if version == 2 else ("simvq-16k", 16000))


def test_per_stage_widths_round_trip_in_every_form():
    rng = np.random.default_rng(21)
    for bits in [(16, 10), (14, 10, 10, 10, 10), (1, 16, 7, 3, 3, 3), (13, 13, 10) + (10,) * 9, (9, 2, 5)]:
        for known in (True, False):
            frames = int(rng.integers(0, 40))
            codes = random_codes(rng, len(bits), bits, frames)
            codes[:, :1] = (1 << np.array(bits))[:, None] - 1
            h = header(len(bits), bits, frames, known=known)
            data = tok_bytes(h, codes, num_samples=None if known else frames * 320)
            assert len(data) == 16 + -(-frames * sum(bits) // 8) + (4 if known else 12)
            got_h, got = read_tok(NoSeek(data, seed=frames))
            np.testing.assert_array_equal(got, codes)
            assert got_h.stage_bits == bits and got_h.frame_bits == sum(bits)
            assert got_h.codebook_sizes == tuple(1 << b for b in bits)
            assert got_h.bits_per_code is None and h.nominal_bitrate == sum(bits) * 50


def test_widths_the_header_cannot_hold_are_refused():
    with pytest.raises(TokFormatError, match="one for the rest, got 5 stages: 10\\+10\\+10\\+12\\+10 bits"):
        TokHeader("m", HASH, 16000, 320, 5, (10, 10, 10, 12, 10))
    with pytest.raises(TokFormatError, match="version 1 holds one width for every stage"):
        TokHeader("m", HASH, 16000, 320, 2, (14, 10), version=1)
    with pytest.raises(TokFormatError, match="stage_bits has 2 widths for 3 stages"):
        TokHeader("m", HASH, 16000, 320, 3, (14, 10))
    # a width given for a stage the file does not have: the header is not the one a writer makes
    expect_error(raw_v2(layout=1, widths=0x3033), "stage widths 0x3033 set bits for stages the file does not have")
    assert read_bytes(raw_v2(layout=1, widths=0x0033))[0].stage_bits == (4, 4)


def test_long_recording_keeps_its_count_in_the_trailer():
    samples = 2**32 + 5  # more than the header's 32 bits
    h = TokHeader("m", HASH, 16000, 65535, 1, 1, num_samples=samples, num_frames=-(-samples // 65535))
    assert h.counts_in_trailer and h.file_bytes() == 16 + -(-h.num_frames // 8) + 8 + 4
    data = tok_bytes(h, np.ones((1, h.num_frames), dtype=np.int64))
    assert data[3] == 0x40 and data[12:16] == bytes(4) and len(data) == h.file_bytes()
    assert data[-12:-4] == struct.pack("<Q", samples)
    got_h, got = read_bytes(data)
    assert got_h.num_samples == samples and got.shape == (1, h.num_frames) and got.all()


def test_hash_names_the_weights():
    sha = HASH.hex() + "ff" * 24
    assert header().made_with(sha) and header(version=1).made_with(sha.upper())
    assert read_bytes(tok_bytes(header(), random_codes(np.random.default_rng(0), 3, 10, 7)))[0].made_with(sha)
    assert not header().made_with("00" + sha[2:])


def test_bitrate_close_to_nominal():
    for version, overhead in ((2, 16 + 4), (1, 8 + 35 + 9 + 4)):
        h = header(stages=12, bits=10, frames=3000, samples=3000 * 320, version=version)
        data = tok_bytes(h, np.zeros((12, 3000), dtype=np.int64))
        seconds = h.num_samples / h.sample_rate
        assert h.nominal_bitrate == 6000.0
        assert len(data) * 8 / seconds == pytest.approx(6000 * (1 + overhead / 45000))


def test_uint16_output_and_empty_file():
    h = header(stages=4, bits=16, frames=0, samples=0)
    got_h, got = read_bytes(tok_bytes(h, np.zeros((4, 0), dtype=np.int64)), dtype=np.uint16)
    assert got.shape == (4, 0) and got.dtype == np.uint16 and got_h.num_samples == 0
    codes = np.array([[0, 65535]], dtype=np.uint16)
    _, got = read_bytes(tok_bytes(header(1, 16, 2), codes), dtype=np.uint16)
    assert got.dtype == np.uint16 and got.tolist() == [[0, 65535]]


def test_pack_unpack_split_anywhere():
    rng = np.random.default_rng(4)
    for bits in (1, 5, 8, 11, 16):
        values = rng.integers(0, 1 << bits, size=203)
        data, carry = pack_codes(values, bits)
        assert carry.size == 203 * bits % 8 and len(data) == 203 * bits // 8
        assert int.from_bytes(data + np.packbits(carry, bitorder="little").tobytes(), "little") == sum(
            int(v) << (k * bits) for k, v in enumerate(values)
        )
        data += np.packbits(carry, bitorder="little").tobytes()
        for cut in rng.integers(0, 203, size=10):  # decode in two calls, carrying the leftover bits
            first, left = unpack_codes(data[: cut * bits // 8 + 1], bits, int(cut))
            second, rest = unpack_codes(data[cut * bits // 8 + 1 :], bits, 203 - int(cut), left)
            np.testing.assert_array_equal(np.concatenate([first, second]), values)
            assert rest.size < 8 and not rest.any()


# ------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("known", [True, False])
def test_blocked_writes_equal_one_shot(known):
    rng = np.random.default_rng(1 + known)
    for _ in range(20):
        stages, bits, frames = int(rng.integers(1, 13)), int(rng.integers(1, 17)), int(rng.integers(0, 80))
        codes = random_codes(rng, stages, bits, frames)
        h = header(stages, bits, frames, known=known)
        samples = frames * 320 - 3 if frames else 0
        one_shot = tok_bytes(h, codes, num_samples=None if known else samples)
        buf, start = io.BytesIO(), 0
        writer = TokWriter(buf, h)
        assert buf.getvalue() == h.encode()  # the header goes out immediately
        while start < frames:
            n = int(rng.integers(0, 9))
            writer.write(codes[:, start : start + n])
            start += n
        size = writer.close(None if known else samples)
        assert buf.getvalue() == one_shot and size == len(one_shot)


def test_writer_keeps_only_leftover_bits():
    h = header(stages=1, bits=3, frames=5, samples=5 * 320)
    buf = io.BytesIO()
    w = TokWriter(buf, h)
    base = len(buf.getvalue())
    w.write(np.array([[7, 7]]))  # 6 bits: nothing complete yet
    assert len(buf.getvalue()) == base
    w.write(np.array([[7]]))  # 9 bits: one byte out, one bit carried
    assert len(buf.getvalue()) == base + 1
    w.write(np.array([[0, 1]]))
    w.close()
    assert read_bytes(buf.getvalue())[1].tolist() == [[7, 7, 7, 0, 1]]


@pytest.mark.parametrize("known", [True, False])
def test_reader_blocks_are_bounded_and_complete(known):
    rng = np.random.default_rng(5)
    codes = random_codes(rng, 5, 7, 101)
    data = tok_bytes(header(5, 7, 101, known=known), codes, num_samples=None if known else 101 * 320)
    for block in (1, 3, 64, 1000):
        reader = TokReader(io.BytesIO(data), block_frames=block)
        blocks = list(reader)
        assert all(b.shape[0] == 5 and 1 <= b.shape[1] <= block for b in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks, axis=1), codes)
        assert reader.header.num_frames == 101 and reader.header.num_samples == (
            101 * 320 if not known else header(5, 7, 101).num_samples
        )


@pytest.mark.parametrize("known", [True, False])
def test_read_from_non_seekable_short_reads(known):
    rng = np.random.default_rng(9)
    for stages, bits in [(1, 1), (2, 3), (12, 10), (3, 16)]:
        codes = random_codes(rng, stages, bits, 37)
        data = tok_bytes(header(stages, bits, 37, known=known), codes, num_samples=None if known else 37 * 320)
        got_h, got = read_tok(NoSeek(data, seed=bits))
        np.testing.assert_array_equal(got, codes)
        assert got_h.num_frames == 37


def test_pipe_write_and_read_unknown_length():
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 12, 10, 500)
    r_fd, w_fd = os.pipe()

    def produce():
        with os.fdopen(w_fd, "wb", buffering=0) as w:  # raw: writes may be partial
            writer = TokWriter(w, header(12, 10, known=False))
            for start in range(0, 500, 17):
                writer.write(codes[:, start : start + 17])
            writer.close(500 * 320 - 100)

    thread = threading.Thread(target=produce)
    thread.start()
    with os.fdopen(r_fd, "rb") as r:
        reader = TokReader(r, block_frames=50)
        got = np.concatenate(list(reader), axis=1)
    thread.join()
    np.testing.assert_array_equal(got, codes)
    assert reader.header.num_samples == 500 * 320 - 100


# ------------------------------------------------------------------------------ read errors


def expect_error(data, match):
    with pytest.raises(TokFormatError, match=match) as info:
        read_bytes(data)
    assert "\n" not in str(info.value)


def test_rejects_wrong_magic_and_version_and_flags():
    good = raw_file()
    expect_error(b"", "not a SimVQ token file")
    expect_error(b"RIFF" + good[4:], "not a SimVQ token file")
    expect_error(b"\x89PNG\r\n", "not a SimVQ token file")
    expect_error(b"SVG file" + good[8:], "not a SimVQ token file")
    expect_error(b"SVQX" + good[4:], "not a SimVQ token file")
    expect_error(raw_file(version=2), "unsupported token file version 2 after SVQT")  # version 2 is "SV" 02
    expect_error(raw_file(flags=0x82), "unknown flags 0x82")
    expect_error(raw_v2(version=3), r"unsupported token file version 3 \(this reader knows 1 and 2\)")
    expect_error(raw_v2(layout=0x81), "unknown flags 0x80")
    expect_error(raw_v2(layout=0x41, trailer_samples=640), "header counts must be 0")
    expect_error(raw_v2(hop=0, samples=0, payload=b""), "hop_length 0 out of range")


@pytest.mark.parametrize("v2", [True, False])
def test_truncated_file_says_expected_size(v2):
    data = raw_v2(samples=900) if v2 else raw_file(frames=3, samples=900)
    assert len(read_bytes(data)[1][0]) == 3
    for cut in range(1, len(data)):
        with pytest.raises(TokFormatError, match="truncated token file: expected") as info:
            read_bytes(data[:cut])
        if cut >= (16 if v2 else 44):  # past the header, the exact size is known
            assert f"expected {len(data)} bytes, got {cut}" in str(info.value)
        elif cut < 3 or v2:
            assert "expected at least 20 bytes" in str(info.value)  # the smallest file


def test_truncated_unknown_length():
    h = header(2, 5, known=False)
    data = tok_bytes(h, np.ones((2, 40), dtype=np.int64), num_samples=40 * 320)
    for cut in range(h.header_bytes, len(data)):
        with pytest.raises(TokFormatError):
            read_bytes(data[:cut])
    expect_error(data[: h.header_bytes + 10], r"truncated token file: expected at least \d+ bytes")


@pytest.mark.parametrize("v2", [True, False])
def test_trailing_bytes_and_crc(v2):
    data = raw_v2() if v2 else raw_file()
    expect_error(data + b"\x00", "trailing bytes")
    streamed = (
        raw_v2(layout=0x41, samples=0, trailer_samples=640)
        if v2
        else raw_file(flags=1, samples=0, frames=0, trailer_counts=(640, 2))
    )
    assert read_bytes(streamed)[0].num_frames == 2
    tail = 12 if v2 else 20
    expect_error(streamed + b"\x00", "bytes after the end of the file")
    expect_error(streamed + streamed[-tail:], "bytes after the end of the file")
    bad = bytearray(data)
    bad[len(data) - 5] ^= 0x10
    expect_error(bytes(bad), "CRC32 mismatch")
    bad = bytearray(data)
    bad[-1] ^= 0x01
    expect_error(bytes(bad), "CRC32 mismatch")


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(sr=0), "sample_rate 0 out of range"),
        (dict(sr=384001), "sample_rate 384001 out of range"),
        (dict(hop=0), "hop_length 0 out of range"),
        (dict(stages=0, frames=0, samples=0), "n_stages 0 out of range"),
        (dict(stages=65), "n_stages 65 out of range"),
        (dict(bits=0), "bits per code 0 out of range"),
        (dict(bits=17), "bits per code 17 out of range"),
        (dict(frames=10**10 + 1, samples=(10**10 + 1) * 320, payload=b""), "num_frames 10000000001 out of range"),
        (dict(frames=3, samples=640), "inconsistent with num_samples 640"),
        (dict(frames=1, samples=0), "inconsistent"),
        (dict(model_id=b""), r"header length 35 out of range \[36, 290\]"),
        (dict(model_id=b"\xff\xfe"), "not valid UTF-8"),
        (dict(header_len=40), "header length 40 does not match"),
        (dict(header_len=300), "header length 300 out of range"),
        (dict(flags=1), "header counts must be 0"),
    ],
)
def test_rejects_header_values_out_of_range(fields, match):
    expect_error(raw_file(**fields), match)


def test_rejects_empty_model_id_and_inconsistent_trailer():
    expect_error(raw_file(model_id=b"", header_len=36), "header length 36 does not match the model id length 0")
    expect_error(raw_file(flags=1, samples=0, frames=0, trailer_counts=(641, 2)), "inconsistent")
    expect_error(
        raw_file(flags=1, samples=0, frames=0, trailer_counts=(640, 2), payload=b"\x00" * 5), "unexpected bytes"
    )
    expect_error(
        raw_file(flags=1, stages=1, bits=8, samples=0, frames=0, trailer_counts=(640, 2), payload=b"\x01\x02\x00"),
        "1 unexpected bytes",
    )  # one zero byte too many
    expect_error(raw_v2(layout=0x41, samples=0, trailer_samples=2**64 - 1, payload=b""), "bad trailer.*num_frames")
    expect_error(raw_v2(layout=0x41, samples=0, trailer_samples=640, payload=b"\x00" * 3), "1 unexpected bytes")


def test_huge_claims_fail_fast_without_allocating():
    cases = [
        (raw_file(frames=f, samples=f * 320, stages=64, bits=16, payload=b"\x00" * 100), "out of range|truncated")
        for f in (10**12, 10**10)
    ]  # out of range, then in range but the file is tiny
    cases.append(
        (
            raw_v2(hop=1, layout=63, widths=0xFFFF, samples=2**32 - 1, payload=b"\x00" * 100),  # 64 x 16 bits
            "truncated token file: expected 549755813780 bytes, got 120",
        )
    )
    for data, match in cases:
        tracemalloc.start()
        with pytest.raises(TokFormatError, match=match):
            read_bytes(data)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 20 * 2**20


@pytest.mark.parametrize("known", [True, False])
def test_max_frames_limit(known):
    codes = np.zeros((2, 30), dtype=np.int64)
    data = tok_bytes(header(2, 4, 30, known=known), codes, num_samples=None if known else 30 * 320)
    assert read_bytes(data, max_frames=30)[1].shape == (2, 30)
    with pytest.raises(TokFormatError, match="more than 29 frames"):
        if known:
            TokReader(io.BytesIO(data), max_frames=29)  # refused from the header alone
        else:
            list(TokReader(io.BytesIO(data), block_frames=10, max_frames=29))


def test_nonzero_padding_rejected():
    data = bytearray(raw_file(stages=1, bits=3, frames=1, samples=320, payload=b"\x0f"))
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])))
    expect_error(bytes(data), "non-zero padding")
    expect_error(raw_v2(layout=1, widths=0x21, samples=320, payload=b"\xff"), "non-zero padding")  # 2 + 3 bits


# ------------------------------------------------------------------------------ write errors


def test_writer_rejects_bad_codes_and_counts():
    h = header(stages=2, bits=4, frames=3)
    for bad, match in [
        (np.array([[0, 16, 1], [0, 0, 0]]), r"codes must be in \[0, 16\) for 4 bits, got \[0, 16\]"),
        (np.array([[0, -1, 1], [0, 0, 0]]), r"codes must be in \[0, 16\)"),
        (np.zeros((3, 3), dtype=np.int64), r"shape \[S=2, n\]"),
        (np.zeros(3, dtype=np.int64), "shape"),
        (np.zeros((2, 3), dtype=np.float32), "must be integers"),
        (np.zeros((2, 4), dtype=np.int64), "more frames than"),
    ]:
        with pytest.raises(TokFormatError, match=match):
            write_tok(io.BytesIO(), h, bad)
    mixed = header(stages=2, bits=(6, 4), frames=1)
    write_tok(io.BytesIO(), mixed, np.array([[63], [15]]))
    with pytest.raises(TokFormatError, match=r"codes in stage 2 must be in \[0, 16\) for 4 bits, got \[16, 16\]"):
        write_tok(io.BytesIO(), mixed, np.array([[16], [16]]))  # 16 fits stage 1, not stage 2
    w = TokWriter(io.BytesIO(), h)
    w.write(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TokFormatError, match="wrote 2 frames, the header says 3"):
        w.close()
    w = TokWriter(io.BytesIO(), header(2, 4, known=False))
    w.write(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TokFormatError, match="close\\(num_samples\\) is required"):
        w.close()
    with pytest.raises(TokFormatError, match="inconsistent"):
        w.close(3 * 320)
    assert w.close(2 * 320 - 1) == header(2, 4, known=False).file_bytes(2)


def test_header_constructor_checks():
    for kwargs, match in [
        (dict(model_id="x" * 256), "1..255 UTF-8 bytes"),
        (dict(model_id="é" * 128), "1..255 UTF-8 bytes, got 256"),
        (dict(model_id=""), "1..255"),
        (dict(model_id=None, version=1), "must be a str"),
        (dict(weights_hash=b"\x00" * 32), "4 or 8 bytes"),
        (dict(weights_hash=HASH[:4], version=1), "must be 8 bytes"),
        (dict(sample_rate=True), "bool"),
        (dict(sample_rate=None, version=1), "needs the sample rate"),
        (dict(hop_length=65536), r"hop_length 65536 out of range \[1, 65535\]"),
        (dict(stage_bits=(1, 17)), "bits per code 17 out of range"),
        (dict(stage_bits="10"), "one int per stage"),
        (dict(num_samples=5), "both"),
        (dict(version=3), "unsupported token file version 3"),
    ]:
        args = dict(model_id="m", weights_hash=HASH, sample_rate=16000, hop_length=320, n_stages=2, stage_bits=1)
        args.update(kwargs)
        with pytest.raises(TokFormatError, match=match):
            TokHeader(**args)
    assert TokHeader(None, HASH[:4], None, 65535, 2, [14, 10]).stage_bits == (14, 10)  # as read from a file
    assert TokHeader("m", HASH, 16000, 2**32 - 1, 1, 1, version=1).hop_length == 2**32 - 1


# ------------------------------------------------------------------------------ fuzzing


def _valid_files():
    rng = np.random.default_rng(11)
    files = []
    for stages, bits, frames, known, version in [
        (1, 1, 13, True, 2),
        (3, 10, 9, False, 2),
        (2, 16, 4, True, 2),
        (5, 3, 0, False, 2),
        (12, (14, 10, 12) + (10,) * 9, 6, True, 2),
        (4, (16, 2, 9, 5), 5, False, 2),
        (1, 7, 1, False, 2),
        (3, 10, 9, True, 1),
        (2, 5, 7, False, 1),
        (1, 16, 0, True, 1),
    ]:
        codes = random_codes(rng, stages, bits, frames)
        data = tok_bytes(
            header(stages, bits, frames, known=known, version=version),
            codes,
            num_samples=None if known else frames * 320,
        )
        files.append((data, codes))
    return files


VALID = _valid_files()

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 4)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def mutate(original: bytes, mutations, within: int | None = None) -> bytes:
    """`original` after the mutations in turn, each at a position modulo the length (or the first `within` bytes)."""
    data = bytearray(original)
    for kind, pos, arg in mutations:
        pos = pos % (min(len(data), within or len(data)) + 1)
        if kind == "flip" and pos < len(data):
            data[pos] ^= arg
        elif kind == "insert":
            data[pos:pos] = arg
        elif kind == "delete":
            del data[pos : pos + arg]
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(VALID) - 1),
    mutations=st.lists(mutation, min_size=1, max_size=3),
    non_seekable=st.booleans(),
)
def test_mutated_files_read_identically_or_raise_tokformaterror(index, mutations, non_seekable):
    original, codes = VALID[index]
    data = mutate(original, mutations)
    try:
        _, got = read_tok(NoSeek(data, seed=len(data)) if non_seekable else io.BytesIO(data))
    except TokFormatError as e:
        assert "\n" not in str(e)
        return
    assert data == original  # success only when the mutations cancelled out
    np.testing.assert_array_equal(got, codes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(VALID) - 1),
    mutations=st.lists(mutation, min_size=1, max_size=3),
    header_only=st.booleans(),
)
def test_mutated_files_with_a_valid_crc_give_codes_or_tokformaterror(index, mutations, header_only):
    """With the CRC recomputed, a mutation reaches every range check: the reader yields codes that fit the header
    it read, or raises TokFormatError, never another exception."""
    body = mutate(VALID[index][0][:-4], mutations, within=20 if header_only else None)
    data = body + struct.pack("<I", zlib.crc32(body))
    try:
        h, got = read_tok(io.BytesIO(data))
    except TokFormatError as e:
        assert "\n" not in str(e)
        return
    assert got.shape == (h.n_stages, h.num_frames)
    assert (got < np.array(h.codebook_sizes)[:, None]).all()
