"""training.augment: each change does what it says, off changes nothing, and both data paths share it."""

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import speechlike, write_speaker_corpus
from training.augment import Augmenter, interpolate
from training.bundle_run import DeviceCorpus
from training.config import AugmentConfig, ConfigError, load_config
from training.data import AudioDataset, AudioItem
from training.train import Trainer

TINY = Path(__file__).parent.parent / "training" / "configs" / "tiny.yaml"

RATE = 16000
FREQ = torch.fft.rfftfreq(RATE, 1 / RATE)  # the bins of a 1 s crop


def _run(batch, seed=0, **cfg):
    """Crops and the draws that changed them."""
    augmenter = Augmenter(AugmentConfig(**cfg), RATE)
    draws = augmenter.draw(len(batch), torch.Generator().manual_seed(seed))
    return augmenter.apply(batch, draws), draws


def _white(batch, seed=0):
    return 0.1 * torch.randn(batch, RATE, generator=torch.Generator().manual_seed(seed))


def _power(audio):
    return torch.fft.rfft(audio.double()).abs().square()


def test_band_limit_leaves_nothing_above_the_cutoff_nor_below_the_high_pass():
    x = _white(8)
    y, draws = _run(x, band_prob=1.0, highpass_prob=0.5, resample_prob=0.0)
    power, before = _power(y), _power(x)
    assert draws.band.all() and 0 < int(draws.highpass.sum()) < 8
    cutoffs = draws.cutoff_hz.numpy()
    assert np.all((cutoffs >= 3400) & (cutoffs <= 4000)) and np.ptp(cutoffs) > 200
    for row, cutoff, highpass in zip(power, draws.cutoff_hz, draws.highpass):
        assert row[FREQ >= cutoff].sum() < 1e-12 * row.sum()
        low = row[FREQ <= 300].sum()
        assert low < 1e-12 * row.sum() if highpass else low > 0.01 * row.sum()
    passband = (FREQ > 400) & (FREQ < 3200)
    assert torch.allclose(power[:, passband], before[:, passband], rtol=1e-3)  # the band stays as it was
    assert torch.equal(_run(x, band_prob=1.0)[0], _run(x, band_prob=1.0)[0])  # the same draws, the same crops


def test_round_trip_gives_the_interpolation_of_an_8_khz_signal():
    x = _white(4)
    y, draws = _run(x, band_prob=1.0, highpass_prob=0.0, resample_prob=1.0)
    plain, _ = _run(x, band_prob=1.0, highpass_prob=0.0, resample_prob=0.0)
    assert draws.resample.all() and (y - plain).abs().max() > 1e-3  # it does something beyond the low-pass
    assert torch.allclose(interpolate(y[:, ::2], 2, RATE), y, atol=1e-6)  # its own 8 kHz samples give it back
    power = _power(y * torch.hann_window(RATE, periodic=False))  # windowed: the crop's edges leak otherwise
    assert torch.all(power[:, FREQ > 4600].sum(1) < 1e-7 * power.sum(1))  # the filter's stop band: 63 dB down
    with pytest.raises(ConfigError, match="multiple of it"):
        Augmenter(AugmentConfig(band_prob=0.5, resample_prob=0.5), 22050)


def test_noise_comes_at_the_asked_snr_in_three_colours():
    x = torch.from_numpy(np.stack([speechlike(1.0, RATE, seed) for seed in range(30)]))
    y, draws = _run(x, noise_prob=1.0, noise_snr_db=(20.0, 50.0))
    noise = (y - x).double()
    snr = 10 * torch.log10(x.double().square().sum(1) / noise.square().sum(1))
    assert torch.allclose(snr, draws.snr_db.double(), atol=0.01)
    assert snr.min() >= 20 - 0.01 and snr.max() <= 50 + 0.01 and snr.max() - snr.min() > 10
    assert set(draws.colour.tolist()) == {0, 1, 2}
    band = (FREQ > 100) & (FREQ < 6000)
    slopes = [np.polyfit(np.log10(FREQ[band].numpy()), 10 * np.log10(p[band].numpy()), 1)[0] for p in _power(noise)]
    for slope, colour in zip(slopes, draws.colour.tolist()):  # power falls 10 dB a decade for each colour step
        assert abs(slope + 10 * colour) < 1.0, (slope, colour)
    assert torch.equal(_run(torch.zeros(2, RATE), noise_prob=1.0)[0], torch.zeros(2, RATE))  # silence stays


@pytest.mark.parametrize("rt60", [0.1, 0.3, 0.6])
def test_reverb_tail_decays_at_the_asked_rt60_after_the_direct_path(rt60):
    impulse = torch.zeros(1, RATE)
    impulse[0, 2000] = 1.0
    y, _ = _run(impulse, seed=3, reverb_prob=1.0, reverb_rt60=(rt60, rt60), reverb_drr_db=(6.0, 6.0))
    y = y[0].double().numpy()
    assert np.all(np.abs(y[:2000]) < 1e-6) and abs(y[2000] - 1) < 1e-6  # the direct path, in place
    energy = np.square(y[2001:])
    assert abs(10 * np.log10(1 / energy.sum()) - 6.0) < 0.05  # direct to reverberant: 6 dB
    decay = 10 * np.log10(np.cumsum(energy[::-1])[::-1] / energy.sum())  # Schroeder's integral, dB
    fit = (decay <= -5) & (decay >= -35)
    slope = np.polyfit(np.flatnonzero(fit) / RATE, decay[fit], 1)[0]  # dB per second
    assert abs(-60 / slope - rt60) < 0.1 * rt60


def test_equalisation_moves_band_levels_by_at_most_eq_db_smoothly():
    x = _white(16)
    y, draws = _run(x, eq_prob=1.0, eq_db=4.0)
    gain_db = 10 * torch.log10(_power(y)[:, 1:] / _power(x)[:, 1:])
    assert gain_db.abs().max() <= 4.0 + 1e-3 and gain_db.abs().amax(1).max() > 2.0
    assert gain_db.diff(dim=1).abs().max() < 0.05  # smooth (1 Hz bins): a tilt and a shelf, not a comb
    assert torch.all(draws.tilt_db.abs() + draws.shelf_db.abs() <= 4.0 + 1e-5)


def test_each_change_has_its_own_probability_and_its_own_draws():
    x = _white(64)
    y, draws = _run(x, eq_prob=0.25, reverb_prob=0.5)
    changed = (y != x).any(1)
    assert torch.equal(changed, draws.eq | draws.reverb) and 0 < int(changed.sum()) < 64
    assert 4 <= int(draws.eq.sum()) <= 28 and not draws.band.any() and not draws.noise.any()
    # Turning noise on leaves the room and the equalisation of every crop as they were
    _, more = _run(x, eq_prob=0.25, reverb_prob=0.5, noise_prob=0.5)
    for name in ("eq", "tilt_db", "shelf_hz", "reverb", "rt60", "drr_db", "room_seed"):
        assert torch.equal(torch.as_tensor(getattr(draws, name)), torch.as_tensor(getattr(more, name)))


def _noise_files(tmp_path, count=2, seconds=1.0):
    items = []
    for k in range(count):
        path = tmp_path / f"noise{k}.wav"
        sf.write(path, 0.1 * np.random.default_rng(k).standard_normal(int(seconds * RATE)), RATE)
        items.append(AudioItem(path, f"s{k}", seconds))
    return items


def _cutoff_hz(crop):
    """The highest frequency that holds energy in a crop."""
    power = np.abs(np.fft.rfft(np.asarray(crop, dtype=np.float64))) ** 2
    freq = np.fft.rfftfreq(len(crop), 1 / RATE)
    return freq[np.flatnonzero(power > 1e-12 * power.sum())[-1]]


def test_both_data_paths_limit_the_band_over_the_same_range_and_repeat_their_crops(tmp_path):
    items = _noise_files(tmp_path, seconds=2.0)
    band = AugmentConfig(band_prob=1.0, highpass_prob=0.0, resample_prob=0.0)
    dataset = AudioDataset(items, RATE, 3200, seed=7, augment=band)
    crops = [dataset.crop((0, 0, slot % 2, slot))[0] for slot in range(24)]
    assert torch.equal(crops[5][None], AudioDataset(items, RATE, 3200, seed=7, augment=band).crop((0, 0, 1, 5)))
    corpus = DeviceCorpus(
        items, np.array([12, 12]), RATE, 3200, (0.0, 0.0), 7, 8, torch.device("cpu"), workers=1, augment=band
    )
    batches = torch.cat([corpus.batch(0, i).audio[:, 0] for i in range(3)])
    assert torch.equal(batches[:8], corpus.batch(0, 0).audio[:, 0])
    for path in (crops, batches):
        cutoffs = np.array([_cutoff_hz(crop) for crop in path])
        # each the edge of a low-pass drawn from 3400-4000 Hz, whose last 200 Hz fall to nothing
        assert np.all((cutoffs > 3400 - 200) & (cutoffs < 4000)) and np.ptp(cutoffs) > 300


def test_off_draws_nothing_and_keeps_the_crops_read_before_augmentation_existed(tmp_path):
    items = []
    for k, seconds in enumerate([2.0, 0.1]):
        path = tmp_path / f"s{k}/u.wav"
        path.parent.mkdir()
        sf.write(path, speechlike(seconds, RATE, k), RATE)
        items.append(AudioItem(path, f"s{k}", seconds))
    off = AugmentConfig(band_hz=(1000.0, 2000.0), eq_db=9.0, highpass_prob=1.0)  # ranges changed, all at 0
    crops = []
    for augment in (None, off):
        dataset = AudioDataset(items, RATE, 3200, gain_db=(-6.0, 0.0), seed=7, augment=augment)
        corpus = DeviceCorpus(
            items,
            np.array([3, 1]),
            RATE,
            3200,
            (-6.0, 0.0),
            7,
            2,
            torch.device("cpu"),
            workers=1,
            speed=(0.9, 1.1),
            augment=augment,
        )
        crops.append(
            [dataset.crop(key) for key in [(0, 0, 0, 5), (1, 0, 0, 5), (0, 0, 1, 3)]] + [corpus.batch(0, 1).audio]
        )
    digests = [hashlib.sha1(b"".join(c.numpy().tobytes() for c in run)).hexdigest() for run in crops]
    assert digests == ["ada7cf0ee5b05c904a59d79efbe6d10400242077"] * 2  # as the code before this module read them


def test_rate_dependent_settings_are_checked_against_the_model_rate():
    with pytest.raises(ConfigError, match="Nyquist"):
        Augmenter(AugmentConfig(band_prob=0.1, band_hz=(3400.0, 9000.0)), RATE)
    with pytest.raises(ConfigError, match="no pass band"):
        Augmenter(AugmentConfig(band_prob=0.1, highpass_hz=3300.0), RATE)
    assert not Augmenter(dataclasses.replace(AugmentConfig(), band_hz=(3400.0, 9000.0)), RATE).enabled


def test_the_trainer_reads_band_limited_batches_when_the_config_asks(tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus = write_speaker_corpus(tmp_path / "corpus")
    common = [f"data.train={corpus}", "data.dev=null", "data.dev_fraction=0.34", "eval_every=0", "data.batch_size=4"]
    band = ["data.augment.band_prob=1", "data.augment.band_hz=[3000, 3000]", "data.augment.highpass_prob=0"]
    tops = []
    for overrides in (common, common + band):
        trainer = Trainer(load_config(TINY, overrides), tmp_path / f"run{len(tops)}")
        loader, _ = trainer._loader()
        tops.append(max(_cutoff_hz(crop) for crop in next(iter(loader)).audio[:, 0].numpy()))
    assert tops[0] > 6000 and tops[1] < 3000
