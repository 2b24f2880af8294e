"""Peer codecs of eval/ through the real opusenc/opusdec and c2enc/c2dec, and skipping when they are missing."""

import shutil

import numpy as np
import pytest

from codec.manifest import AudioItem
from eval.metrics import score
from eval.oggopus import read_opus_stream
from eval.peers import Codec2, Opus, missing_tools, peer_codecs
from eval.run import evaluate
from tests.conftest import example_speech

needs_opus = pytest.mark.skipif(
    shutil.which("opusenc") is None or shutil.which("opusdec") is None, reason="opus-tools not installed"
)
needs_codec2 = pytest.mark.skipif(
    shutil.which("c2enc") is None or shutil.which("c2dec") is None, reason="codec2 not installed"
)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return example_speech()[:48000]  # 3 s of the shipped recording


@needs_opus
def test_opus_bitrate_from_file_bytes(clip):
    run = Opus(12.0).run(clip)
    seconds = clip.size / 16000
    kbps, payload = run.num_bytes * 8 / seconds / 1000, run.payload_bytes * 8 / seconds / 1000
    assert payload < kbps  # Ogg pages and header packets cost something
    assert 9.0 < payload < 15.0
    assert run.decoded.size == clip.size  # opusdec removes the pre-skip
    s = score(clip, run.decoded)
    assert abs(s.delay_ms) <= 1.0
    assert s.pesq_wb > 3.0 and s.stoi > 0.9


@needs_opus
def test_opus_lower_bitrate_is_smaller_and_worse(clip):
    low, high = Opus(6.0).run(clip), Opus(12.0).run(clip)
    assert low.num_bytes < high.num_bytes
    assert score(clip, low.decoded).pesq_wb < score(clip, high.decoded).pesq_wb


def test_ogg_parser_accounts_for_every_byte(tmp_path, clip):
    if shutil.which("opusenc") is None:
        pytest.skip("opus-tools not installed")
    import soundfile as sf
    import subprocess

    sf.write(tmp_path / "a.wav", clip, 16000, subtype="PCM_16")
    subprocess.run(
        ["opusenc", "--quiet", "--bitrate", "8", str(tmp_path / "a.wav"), str(tmp_path / "a.opus")], check=True
    )
    info = read_opus_stream((tmp_path / "a.opus").read_bytes())
    assert info.duration_seconds == pytest.approx(clip.size / 16000, abs=1e-3)
    assert info.final_granule == 48000 * 3 + info.pre_skip
    assert info.audio_packets == -(-info.final_granule // 960)  # 20 ms packets cover pre-skip + 3 s
    assert 0 < info.audio_packet_bytes < info.file_bytes


@needs_codec2
@pytest.mark.parametrize("mode,kbps", [("3200", 3.2), ("700C", 0.8)])
def test_codec2_bitrate_and_quality(clip, mode, kbps):
    run = Codec2(mode).run(clip)
    seconds = clip.size / 16000
    assert run.num_bytes - run.payload_bytes == 7  # the .c2 header
    assert run.payload_bytes * 8 / seconds / 1000 == pytest.approx(kbps, rel=0.03)  # 700C packs 28 bits in 4 bytes
    s = score(clip, run.decoded)
    assert 5.0 < s.delay_ms < 45.0  # Codec 2's own delay, found by the envelope search
    assert s.stoi > 0.6


def test_missing_tools_are_reported_and_skipped(tmp_path, clip):
    import soundfile as sf

    sf.write(tmp_path / "a.wav", clip, 16000)
    peers = peer_codecs()
    assert [p.setting for p in peers] == ["6kbps", "8kbps", "12kbps", "3200", "1600", "700C"]
    assert missing_tools(peers[0], path="/nonexistent") == ["opusenc", "opusdec"]
    item = AudioItem(tmp_path / "a.wav", "", key="a.wav", named_speaker=False)
    result = evaluate([item], peers, jobs=1, progress=False, tool_path="/nonexistent")
    assert result.rows == [] and result.averages == []
    assert result.skipped == {"opus": "opusenc, opusdec not found on PATH", "codec2": "c2enc, c2dec not found on PATH"}


def test_unknown_peer_settings_are_rejected():
    with pytest.raises(ValueError, match="opus, codec2"):
        peer_codecs(("mp3",))
    with pytest.raises(ValueError, match="Codec 2 mode"):
        peer_codecs(("codec2",), codec2_modes=("9999",))
