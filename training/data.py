"""Training audio: manifests and folder trees, speaker split, deterministic random crops, dev clips."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr
import torch

from codec.audio import read_audio, to_pcm16
from codec.errors import AudioError
from codec.manifest import AudioItem, read_listing  # AudioItem: the one corpus item type
from training.augment import Augmenter
from training.config import AugmentConfig

TRAIN_SPLITS = ("train",)
DEV_SPLITS = ("dev", "valid", "validation")


@dataclass(frozen=True)
class Batch:
    """A training batch and where it sits in the data order (what a checkpoint stores to resume).

    Args:
        audio: [B, 1, T] float32 crops.
        epoch: epoch of the batch.
        index: index of the batch within its epoch (counted over all processes).
    """

    audio: torch.Tensor
    epoch: int
    index: int


def load_items(source: str | Path) -> list[AudioItem]:
    """Items of a manifest or a folder tree (`codec.manifest.read_listing`); a scanned file's duration is
    read from its header."""
    items = read_listing(source)
    if Path(source).is_dir():
        items = [replace(item, duration=_duration(item.path)) for item in items]
    return items


def load_dev_ood(source: str | Path) -> list[AudioItem]:
    """The files of the out-of-domain dev set (`data.dev_ood`): at least one (`load_items` refuses an empty
    listing), or an error that names the key."""
    try:
        return load_items(source)
    except AudioError as e:
        raise AudioError(f"data.dev_ood: {e} (`make corpus` writes one; data.dev_ood=null scores none)") from None


def split_items(
    train: list[AudioItem], dev: list[AudioItem] | None, dev_fraction: float
) -> tuple[list[AudioItem], list[AudioItem]]:
    """Train and dev items: the manifests' own split when they have one, else a speaker split of `train`."""
    has_split = any(item.split for item in train)
    if has_split:
        train_part = [item for item in train if item.split in TRAIN_SPLITS]
        if dev is None:
            dev = [item for item in train if item.split in DEV_SPLITS]
        train = train_part
    if dev is None:
        train, dev = split_by_speaker(train, dev_fraction)
    if not train:
        raise AudioError("the training set is empty (no rows with split 'train'?)")
    if not dev:
        raise AudioError("the dev set is empty: give data.dev or a manifest with dev rows")
    return train, dev


def split_by_speaker(items: list[AudioItem], dev_fraction: float) -> tuple[list[AudioItem], list[AudioItem]]:
    """Hold out whole speakers for dev: the same speakers on every machine and run (sha1 order, no seed)."""
    speakers = sorted({item.speaker for item in items}, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    if len(speakers) < 2:
        raise AudioError(
            f"cannot hold out a dev speaker: the corpus has {len(speakers)} speaker(s); give data.dev explicitly"
        )
    n_dev = min(len(speakers) - 1, max(1, round(dev_fraction * len(speakers))))
    dev_speakers = set(speakers[:n_dev])
    return (
        [item for item in items if item.speaker not in dev_speakers],
        [item for item in items if item.speaker in dev_speakers],
    )


def decode(path: Path, sample_rate: int) -> np.ndarray:
    """A file as int16 [T], mono, at `sample_rate` (decoded, mixed down and resampled by codec.audio)."""
    audio, _ = read_audio(path, sample_rate)
    return to_pcm16(audio)[0].astype(np.int16)


class AudioDataset(torch.utils.data.Dataset):
    """Random fixed-length crops with random gain; each example is a pure function of (seed, epoch, slot).

    Keys come from `EpochBatchSampler`: `(epoch, batch, item, slot)`. Workers never use their own RNG, so a
    resumed run reads exactly the batches an uninterrupted run would.

    Args:
        items: the files.
        sample_rate: model rate in Hz; files are resampled to it.
        segment_samples: crop length (a multiple of the model's hop); shorter files are zero-padded at a
            random offset.
        gain_db: (low, high) uniform random gain in dB; crops are scaled down to stay below 0.99 peak.
        speed: (low, high) range of a random speed factor, log-uniform: the crop plays that much faster,
            pitch and formants shifted with it (Kaldi's speed perturbation), so the model hears more voices
            than the corpus has. (1, 1) leaves the audio as recorded.
        seed: run seed.
        cache: keep decoded audio (int16) in memory in each process.
        augment: telephone band, equalisation, noise and reverberation (`training.augment`), applied after
            the gain with a generator seeded from the crop's own random numbers; off by default.
    """

    def __init__(
        self,
        items: Sequence[AudioItem],
        sample_rate: int,
        segment_samples: int,
        gain_db: tuple[float, float] = (0.0, 0.0),
        seed: int = 0,
        cache: bool = True,
        speed: tuple[float, float] = (1.0, 1.0),
        augment: AugmentConfig | None = None,
    ):
        if not items:
            raise AudioError("no audio files to train on")
        self.items = list(items)
        self.sample_rate = sample_rate
        self.segment_samples = segment_samples
        self.gain_db = gain_db
        self.speed = tuple(speed)
        self.seed = seed
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        self.augment = Augmenter(augment or AugmentConfig(), sample_rate)

    def __len__(self) -> int:
        return len(self.items)

    def audio(self, index: int) -> np.ndarray:
        """Decoded int16 audio of item `index` at the model rate (cached when enabled)."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        audio = decode(self.items[index].path, self.sample_rate)
        if self.cache is not None:
            self.cache[index] = audio
        return audio

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """The crop of `key` and its batch's (epoch, index), which `collate` passes on."""
        return self.crop(key), (key[0], key[1])

    def crop(self, key: tuple[int, int, int, int]) -> torch.Tensor:
        """The [1, segment_samples] crop of `key` = (epoch, batch, item, slot)."""
        epoch, _, index, slot = key
        rng = np.random.default_rng([self.seed, epoch, slot])
        audio = self.audio(index)
        n = self.segment_samples
        factor = 1.0
        if self.speed != (1.0, 1.0):  # drawn only then: runs without it keep their crops
            factor = float(np.exp(rng.uniform(*np.log(self.speed))))
        span = int(np.ceil(n * factor))  # samples read, before the change of speed
        crop = np.zeros(span, dtype=np.float32)
        if len(audio) >= span:
            start = int(rng.integers(0, len(audio) - span + 1))
            crop[:] = audio[start : start + span]
        else:
            start = int(rng.integers(0, span - len(audio) + 1))
            crop[start : start + len(audio)] = audio
        if factor != 1.0:
            # Played `factor` times faster: read at rate * factor, resampled to the model rate.
            crop = soxr.resample(crop, self.sample_rate * factor, self.sample_rate, quality="HQ")
            crop = np.pad(crop, (0, max(0, n - len(crop))))[:n].astype(np.float32, copy=False)
        crop *= np.float32(10.0 ** (rng.uniform(*self.gain_db) / 20.0) / 32768.0)
        if self.augment.enabled:  # drawn only then, as the speed is
            generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
            crop = self.augment(torch.from_numpy(crop)[None], generator)[0].numpy()
        peak = float(np.abs(crop).max())
        if peak > 0.99:
            crop *= np.float32(0.99 / peak)
        return torch.from_numpy(crop)[None]

    def slots_per_item(self) -> np.ndarray:
        """Crops per item per epoch: its duration in segments (at least 1), so long files are seen more."""
        seconds = self.segment_samples / self.sample_rate
        durations = [item.duration if item.duration is not None else _duration(item.path) for item in self.items]
        return np.maximum(1, np.round(np.asarray(durations) / seconds)).astype(np.int64)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Endless batches of `(epoch, batch, item, slot)` keys for one process of `world_size`.

    Each epoch lists every item `repeats[i]` times, shuffles with a generator seeded by (seed, epoch), drops
    the incomplete last global batch, and gives process `rank` its share of each global batch.

    Args:
        repeats: [N] crops per item per epoch.
        batch_size: examples per process per batch.
        seed: run seed.
        rank, world_size: this process and the number of processes.
        epoch, batch: where to start (a checkpoint's data position).
    """

    def __init__(
        self,
        repeats: np.ndarray,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        batch: int = 0,
    ):
        self.slots = np.repeat(np.arange(len(repeats)), repeats)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(self.slots) // self.global_batch
        if self.batches_per_epoch == 0:
            raise AudioError(
                f"the training set gives {len(self.slots)} crops per epoch, fewer than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.start = (epoch, batch)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        epoch, batch = self.start
        while True:
            order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.slots))
            for b in range(batch, self.batches_per_epoch):
                first = b * self.global_batch + self.rank * self.batch_size
                positions = order[first : first + self.batch_size]
                yield [(epoch, b, int(self.slots[p]), int(p)) for p in positions]
            epoch, batch = epoch + 1, 0

    def next_position(self, epoch: int, batch: int) -> tuple[int, int]:
        """The data position after batch `batch` of `epoch`."""
        return (epoch, batch + 1) if batch + 1 < self.batches_per_epoch else (epoch + 1, 0)


def collate(examples: list[tuple[torch.Tensor, tuple[int, int]]]) -> Batch:
    """Stack `AudioDataset` examples of one batch into a `Batch` [B, 1, T] that knows its data position."""
    audio = torch.stack([audio for audio, _ in examples])
    epoch, index = examples[0][1]
    return Batch(audio, epoch, index)


def dev_clips(
    items: Sequence[AudioItem], sample_rate: int, hop_length: int, count: int, max_samples: int
) -> list[torch.Tensor]:
    """Fixed dev clips `[1, T]` (T a multiple of the hop, at most `max_samples`), spread over the speakers.

    Items are taken round-robin over speakers, each speaker's files in sha1 order, so the set is the same
    on every run. Clips shorter than 0.25 s are skipped."""
    clips = dev_clip_audio(items, sample_rate, hop_length, count, max_samples)
    return [torch.from_numpy(audio.astype(np.float32) / 32768.0)[None] for _, audio in clips]


def dev_clip_audio(
    items: Sequence[AudioItem], sample_rate: int, hop_length: int, count: int, max_samples: int
) -> list[tuple[AudioItem, np.ndarray]]:
    """The files `dev_clips` chooses, each with its clip as int16 [T] (training.bundle packs these)."""
    by_speaker: dict[str, list[AudioItem]] = {}
    for item in sorted(items, key=lambda it: hashlib.sha1(str(it.path).encode()).hexdigest()):
        by_speaker.setdefault(item.speaker, []).append(item)
    queues = [by_speaker[s] for s in sorted(by_speaker)]
    clips: list[tuple[AudioItem, np.ndarray]] = []
    while len(clips) < count and any(queues):
        for queue in queues:
            if not queue or len(clips) >= count:
                continue
            item = queue.pop(0)
            audio = decode(item.path, sample_rate)[:max_samples]
            usable = len(audio) // hop_length * hop_length
            if usable >= sample_rate // 4:
                clips.append((item, audio[:usable]))
    if not clips:
        raise AudioError("no dev file is long enough to score (0.25 s)")
    return clips


def _duration(path: Path) -> float:
    try:
        return sf.info(str(path)).duration
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"cannot read {path}: {e}") from None
