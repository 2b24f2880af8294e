"""training.data: manifests, speaker guessing and split, resampling, crop determinism, batch order."""

import numpy as np
import pytest
import soundfile as sf
import torch

from codec.errors import AudioError
from codec.manifest import speaker_from_path
from tests.conftest import speechlike
from training.data import (
    AudioDataset,
    AudioItem,
    EpochBatchSampler,
    decode,
    dev_clips,
    load_items,
    split_by_speaker,
    split_items,
)


def _write(path, seconds=1.0, rate=16000, seed=0, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = speechlike(seconds, rate, seed)
    if channels > 1:
        audio = np.stack([audio] * channels, axis=1)
    sf.write(path, audio, rate)
    return path


def test_speaker_from_corpus_layouts(tmp_path):
    root = tmp_path
    assert speaker_from_path(root / "train-clean-100/19/198/19_198_000000_000000.wav", root) == "19"
    assert speaker_from_path(root / "dev-clean/84/121123/84-121123-0000.flac", root) == "84"
    assert speaker_from_path(root / "wav48_silence_trimmed/p225/p225_001_mic1.flac", root) == "p225"
    assert speaker_from_path(root / "wav/asterisk-en/hello-world.wav", root) == "asterisk-en"


def test_csv_manifest_relative_paths_and_split(tmp_path):
    _write(tmp_path / "corpus/wav/a/x.wav")
    _write(tmp_path / "corpus/wav/b/y.wav")
    (tmp_path / "corpus/manifest.csv").write_text(
        "path,speaker,duration,split,source,language\nwav/a/x.wav,a,1.0,train,s,en\nwav/b/y.wav,b,1.0,dev,s,fr\n"
    )
    items = load_items(tmp_path / "corpus/manifest.csv")
    assert [i.path for i in items] == [(tmp_path / f"corpus/wav/{s}.wav").resolve() for s in ("a/x", "b/y")]
    assert [(i.speaker, i.duration, i.split) for i in items] == [("a", 1.0, "train"), ("b", 1.0, "dev")]
    train, dev = split_items(items, None, 0.1)
    assert [i.speaker for i in train] == ["a"] and [i.speaker for i in dev] == ["b"]


def test_plain_list_manifest_and_folder_scan(tmp_path):
    _write(tmp_path / "spk1/u1.wav", seconds=0.5)
    _write(tmp_path / "spk2/u2.flac", seconds=0.75)
    (tmp_path / "list.txt").write_text("spk1/u1.wav\n# comment\nspk2/u2.flac\n")
    listed = load_items(tmp_path / "list.txt")
    assert [i.speaker for i in listed] == ["spk1", "spk2"]
    scanned = load_items(tmp_path)
    assert [round(i.duration, 3) for i in scanned] == [0.5, 0.75]
    with pytest.raises(AudioError, match="no folder or manifest"):
        load_items(tmp_path / "missing.csv")


def test_speaker_split_is_deterministic_and_holds_out_whole_speakers():
    items = [AudioItem(f"/x/{s}/{i}.wav", f"spk{s}") for s in range(20) for i in range(5)]
    train, dev = split_by_speaker(items, 0.1)
    again_train, again_dev = split_by_speaker(list(reversed(items)), 0.1)
    dev_speakers = {i.speaker for i in dev}
    assert len(dev_speakers) == 2 and dev_speakers == {i.speaker for i in again_dev}
    assert not dev_speakers & {i.speaker for i in train}
    assert len(train) + len(dev) == len(items)
    with pytest.raises(AudioError, match="1 speaker"):
        split_by_speaker(items[:5], 0.1)


def test_decode_resamples_and_mixes_down(tmp_path):
    t = np.arange(22050) / 22050
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 440 * t)], axis=1)
    sf.write(tmp_path / "a.ogg", stereo.astype(np.float32), 22050)
    audio = decode(tmp_path / "a.ogg", 16000)
    assert audio.dtype == np.int16 and abs(len(audio) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float64)))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 3
    assert 0.25 < np.abs(audio).max() / 32768 < 0.35  # mean of the two channels: 0.3
    with pytest.raises(AudioError, match="nothing.wav"):
        decode(tmp_path / "nothing.wav", 16000)


def _dataset(tmp_path, **kw):
    items = [AudioItem(_write(tmp_path / f"s{i}/u.wav", seconds=s, seed=i), f"s{i}") for i, s in enumerate([2.0, 0.1])]
    return AudioDataset(items, 16000, 3200, gain_db=(-6.0, 0.0), seed=7, **kw)


def test_crops_are_a_pure_function_of_seed_epoch_and_slot(tmp_path):
    ds = _dataset(tmp_path)
    a = ds.crop((0, 0, 0, 5))
    fresh = _dataset(tmp_path, cache=False)  # another process, no cache: same crop
    assert torch.equal(a, fresh.crop((0, 0, 0, 5)))
    assert a.shape == (1, 3200) and a.abs().max() <= 0.99
    assert not torch.equal(a, ds.crop((1, 0, 0, 5)))  # another epoch, another crop
    short = ds.crop((0, 0, 1, 3))  # 0.1 s file: zero-padded to the segment
    assert short.shape == (1, 3200) and int((short != 0).sum()) <= 1600
    assert ds.slots_per_item().tolist() == [10, 1]


def test_speed_perturbation_moves_the_pitch_and_keeps_the_crop_length(tmp_path):
    tone = 0.3 * np.sin(2 * np.pi * 400 * np.arange(32000) / 16000)
    sf.write(tmp_path / "tone.wav", tone.astype(np.float32), 16000)
    items = [AudioItem(tmp_path / "tone.wav", "s0")]

    def peak_hz(crop):
        spectrum = np.abs(np.fft.rfft(crop[0].numpy().astype(np.float64) * np.hanning(crop.shape[-1])))
        return np.argmax(spectrum) * 16000 / crop.shape[-1]

    plain = AudioDataset(items, 16000, 3200, seed=7)
    faster = AudioDataset(items, 16000, 3200, seed=7, speed=(1.25, 1.25))
    crop = faster.crop((0, 0, 0, 2))
    assert crop.shape == (1, 3200) and crop.dtype == torch.float32
    assert abs(peak_hz(plain.crop((0, 0, 0, 2))) - 400) <= 5 and abs(peak_hz(crop) - 500) <= 5
    # (1, 1) draws nothing more: a run without it reads exactly the crops it read before
    as_recorded = AudioDataset(items, 16000, 3200, seed=7, speed=[1.0, 1.0])
    assert torch.equal(plain.crop((0, 0, 0, 2)), as_recorded.crop((0, 0, 0, 2)))
    ranged = AudioDataset(items, 16000, 3200, seed=7, speed=(0.9, 1.1))
    assert all(360 - 5 <= peak_hz(ranged.crop((0, 0, 0, slot))) <= 440 + 5 for slot in range(6))
    assert len({round(peak_hz(ranged.crop((0, 0, 0, slot)))) for slot in range(6)}) > 1


def test_sampler_resumes_at_data_position_and_splits_ranks():
    repeats = np.array([3, 1, 2, 4, 1, 1])
    full = EpochBatchSampler(repeats, batch_size=2, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(9)]  # 12 slots / 2 = 6 batches per epoch: crosses into epoch 1
    assert [b[0][:2] for b in first] == [(0, i) for i in range(6)] + [(1, i) for i in range(3)]
    resumed = iter(EpochBatchSampler(repeats, batch_size=2, seed=3, epoch=0, batch=4))
    assert [next(resumed) for _ in range(5)] == first[4:]
    assert sorted(k[3] for b in first[:6] for k in b) == list(range(12))  # every slot once per epoch
    r0 = next(iter(EpochBatchSampler(repeats, 2, seed=3, rank=0, world_size=2)))
    r1 = next(iter(EpochBatchSampler(repeats, 2, seed=3, rank=1, world_size=2)))
    assert not {k[3] for k in r0} & {k[3] for k in r1}
    assert full.next_position(0, 5) == (1, 0) and full.next_position(0, 2) == (0, 3)
    with pytest.raises(AudioError, match="fewer than one global batch"):
        EpochBatchSampler(np.array([1]), batch_size=2)


def test_dev_clips_are_whole_frames_and_spread_over_speakers(tmp_path):
    items = [
        AudioItem(_write(tmp_path / f"s{s}/{i}.wav", 1.3, seed=s * 3 + i), f"s{s}") for s in range(2) for i in range(2)
    ]
    clips = dev_clips(items, 16000, 320, count=3, max_samples=16000)
    assert len(clips) == 3
    assert all(c.shape[-1] % 320 == 0 and c.shape[-1] <= 16000 for c in clips)
    assert clips[0].shape == (1, 16000)
    again = dev_clips(items, 16000, 320, count=3, max_samples=16000)
    assert all(torch.equal(a, b) for a, b in zip(clips, again))
