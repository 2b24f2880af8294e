"""Metrics and alignment of eval/: PESQ, STOI, ESTOI, SI-SDR, mel distance on real speech."""

import math

import numpy as np
import pytest

from codec.errors import AudioError
from eval.align import align, estimate_delay
from eval.metrics import mel_distance, score, si_sdr
from tests.conftest import example_speech


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return example_speech()[:48000].astype(np.float64)  # 3 s of the shipped recording


def test_identical_signal_scores_top(clip):
    s = score(clip, clip)
    assert s.pesq_wb > 4.4
    assert s.stoi > 0.99 and s.estoi > 0.99
    assert s.si_sdr > 100
    assert s.mel_distance == pytest.approx(0.0, abs=1e-9)
    assert s.delay_ms == 0.0
    assert set(s.notes) == {"pesq_nb"}  # only "not requested"


def test_delayed_copy_is_aligned(clip):
    delayed = np.concatenate([np.zeros(112), clip])  # 7 ms at 16 kHz
    s = score(clip, delayed)
    assert s.delay_ms == pytest.approx(7.0)
    assert s.pesq_wb > 4.4 and s.stoi > 0.99 and s.si_sdr > 100


@pytest.mark.parametrize("shift", [-37, 0, 1, 480, 1599])
def test_estimate_delay_both_directions(clip, shift):
    deg = np.concatenate([np.zeros(shift), clip]) if shift >= 0 else clip[-shift:]
    assert estimate_delay(clip, deg, max_lag=1600) == shift
    a = align(clip, deg, max_lag=1600)
    assert a.ref.shape == a.deg.shape
    assert np.allclose(a.ref, a.deg)


def test_delay_search_is_bounded(clip):
    deg = np.concatenate([np.zeros(800), clip])  # 50 ms
    assert abs(estimate_delay(clip, deg, max_lag=160)) <= 160
    assert estimate_delay(clip, deg, max_lag=1600) == 800


def test_white_noise_scores_low(clip):
    noise = np.random.default_rng(0).standard_normal(clip.size) * 0.1
    s = score(clip, noise)
    assert s.pesq_wb < 1.5
    assert s.stoi < 0.5 and s.estoi < 0.2
    assert s.si_sdr < -10
    assert s.mel_distance > 0.5


def test_si_sdr_values(clip):
    rng = np.random.default_rng(1)
    assert si_sdr(clip, 0.3 * clip) > 100
    assert si_sdr(clip, rng.standard_normal(clip.size)) < -20
    noise = rng.standard_normal(clip.size)
    noise *= np.linalg.norm(clip - clip.mean()) / np.linalg.norm(noise) / math.sqrt(10)  # 10 dB below
    assert si_sdr(clip, clip + noise) == pytest.approx(10.0, abs=0.3)
    assert math.isnan(si_sdr(np.zeros(100), np.ones(100)))


def test_mel_distance_level_change(clip):
    assert mel_distance(clip, 0.5 * clip) == pytest.approx(math.log10(2), abs=0.02)


def test_degraded_speech_scores_between(clip):
    noisy = clip + np.random.default_rng(2).standard_normal(clip.size) * 0.02
    s = score(clip, noisy)
    assert 1.1 < s.pesq_wb < 4.0
    assert 0.5 < s.stoi < 0.999


def test_pesq_failures_become_nan_with_reason(clip):
    silent = score(np.zeros(32000), np.zeros(32000))
    assert math.isnan(silent.pesq_wb) and "silent" in silent.notes["pesq_wb"]
    assert math.isnan(silent.stoi) and math.isnan(silent.si_sdr)
    short = score(clip[:2000], clip[:2000])
    assert math.isnan(short.pesq_wb) and "BufferTooShort" in short.notes["pesq_wb"]
    assert math.isnan(short.stoi) and "STOI" in short.notes["stoi"]
    mute = score(clip, np.zeros_like(clip))
    assert math.isnan(mute.pesq_wb) and mute.notes["pesq_wb"] == "silent decoded signal"


def test_pesq_nb_on_request(clip):
    s = score(clip, clip, pesq_nb=True)
    assert s.pesq_nb > 4.0 and "pesq_nb" not in s.notes


def test_bad_input_is_an_audio_error(clip):
    with pytest.raises(AudioError, match="mono"):
        score(np.stack([clip, clip]), clip)
    bad = clip.copy()
    bad[10] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        score(clip, bad)
