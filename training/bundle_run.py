"""Train from a `simvq-codec bundle` for a fixed number of minutes on one GPU (or the CPU), with no network.

    python -m training.bundle_run BUNDLE --minutes 9 --out OUT [--batch-size N] [key=value ...]

The corpus is decoded once into one tensor on the device and every batch is cropped there (`DeviceCorpus`);
the `Trainer` does the rest as `simvq-codec train` does (losses, EMA, calibration, bf16 autocast on CUDA).
The run stops before the minutes are up. Every `--checkpoint-minutes` it writes into OUT the exported model
(`OUT/model`, float16, for `--model OUT/model`) and a portable checkpoint (`OUT/checkpoint.json` and its
shards, `training.portable`): 7 files of at most 16 MiB, 57 MiB in all for the default model. A
rerun with the same OUT (copied back onto a fresh machine, say) continues from there; so does
`simvq-codec train ... init_from=OUT` on a CPU. Full `.pt` checkpoints and logs go to `--work`.

This module imports nothing beyond torch, numpy and the wheels a bundle carries (`training.bundle.WHEELS`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from codec.errors import CodecError
from training import checkpoints
from training.augment import Augmenter
from training.bundle import read_bundle
from training.bundle_args import add_bundle_run_arguments
from training.config import AugmentConfig, ConfigError, DataConfig, load_config
from training.data import AudioItem, Batch, decode
from training.export import export
from training.portable import MAX_FILE_BYTES, PORTABLE, save_portable
from training.train import Trainer

CUDA_BATCH = 64  # 1 s crops: about 12 MB of activations each in float32, so any current GPU holds it
REPORT_SECONDS = 30.0
OUT_FILES, OUT_BYTES = 8, 64 * 2**20  # what a machine that returns few small files gives back


class DeviceCorpus:
    """A corpus decoded once into one int16 tensor on the device, and batches of random crops drawn there.

    The examples are those that `AudioDataset` and `EpochBatchSampler` describe: each file is listed once per
    segment of its duration in every epoch, in an order shuffled per epoch; its crop starts at a random
    sample, or, when the file is shorter, the file sits at a random offset in zeros; a random gain in
    `gain_db` is applied and the crop scaled below 0.99 peak; with `speed`, each crop plays a random factor
    faster (read by linear interpolation here, where `AudioDataset` resamples with soxr: the same speeds, a
    little aliasing above 7 kHz when sped up); with `augment`, the `training.augment.Augmenter` that
    `AudioDataset` uses changes the whole batch at once after the gain: the same code and distributions, with
    cuFFT's rounding on a GPU. The random numbers come from a generator on the device seeded by (seed, epoch)
    for the order and by (seed, epoch, batch) for crops, gains and augmentation, so a batch is a function of its
    data position alone (a resumed run reads the same batches), but not the same numbers as the DataLoader's:
    another generator draws them (there, one per crop).

    Args:
        items: the training files.
        repeats: [N] crops per file per epoch (`AudioDataset.slots_per_item`).
        sample_rate: the model rate; files are resampled to it as they are decoded.
        segment_samples: crop length.
        gain_db: (low, high) uniform gain in dB.
        seed: the run's seed.
        speed: (low, high) log-uniform speed factor (`AudioDataset`); (1, 1) is off.
        augment: telephone band, equalisation, noise and reverberation (`training.augment`); off by default.
        batch_size: crops per batch.
        device: where the audio lives and the crops are made.
        workers: decoding threads (libsndfile and soxr run outside the GIL; default: one per core).
    """

    def __init__(
        self,
        items: Sequence[AudioItem],
        repeats: np.ndarray,
        sample_rate: int,
        segment_samples: int,
        gain_db: tuple[float, float],
        seed: int,
        batch_size: int,
        device: torch.device,
        workers: int | None = None,
        speed: tuple[float, float] = (1.0, 1.0),
        augment: AugmentConfig | None = None,
    ):
        with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            decoded = list(pool.map(lambda item: decode(item.path, sample_rate), items))
        lengths = np.array([len(a) for a in decoded], dtype=np.int64)
        self.device = device
        self.audio = torch.from_numpy(np.concatenate(decoded)).to(device)  # [total] int16, the one copy
        self.lengths = torch.from_numpy(lengths).to(device)
        self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]])).to(device)
        self.slot_item = torch.repeat_interleave(torch.arange(len(items)), torch.as_tensor(repeats)).to(device)
        self.segment_samples, self.gain_db, self.seed, self.batch_size = segment_samples, gain_db, seed, batch_size
        self.speed = tuple(speed)
        self.augment = Augmenter(augment or AugmentConfig(), sample_rate)
        self.batches_per_epoch = len(self.slot_item) // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"the corpus gives {len(self.slot_item)} crops per epoch, fewer than one batch "
                f"of {batch_size}: lower --batch-size"
            )
        self.seconds = float(lengths.sum()) / sample_rate
        self._order: tuple[int, torch.Tensor] | None = None

    def use_data(self, data: DataConfig) -> None:
        """Crop as `data` says from now on (a new phase of the run may change the crop settings)."""
        self.gain_db, self.speed = data.gain_db, tuple(data.speed)
        self.augment = Augmenter(data.augment, self.augment.sample_rate)

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch `index` of `epoch`: [B, 1, segment_samples] float32 on the device."""
        n, device = self.segment_samples, self.device
        if self._order is None or self._order[0] != epoch:
            order = torch.randperm(len(self.slot_item), generator=self._generator(epoch), device=device)
            self._order = (epoch, order)
        item = self.slot_item[self._order[1][index * self.batch_size : (index + 1) * self.batch_size]]
        length = self.lengths[item]
        generator = self._generator(epoch, index)
        draws = torch.rand(2, len(item), generator=generator, device=device, dtype=torch.float64)
        factor = None
        if self.speed != (1.0, 1.0):  # drawn after the others, so runs without it keep their crops
            slow, fast = np.log(self.speed)
            factor = torch.exp(
                slow + (fast - slow) * torch.rand(len(item), generator=generator, device=device, dtype=torch.float64)
            )
        span = n if factor is None else (n * factor).ceil().long()  # samples read, before the change of speed
        # A file at least that long starts at one of its L - span + 1 samples; a shorter one at one of
        # span - L + 1 offsets in the zeros (a negative start). Either way there are |L - span| + 1 choices.
        shift = (draws[0] * ((length - span).abs() + 1)).long()
        start = torch.where(length >= span, shift, -shift)[:, None]
        if factor is None:
            crops = self._samples(item, start + torch.arange(n, device=device))
        else:
            position = start + torch.arange(n, device=device, dtype=torch.float64) * factor[:, None]
            below = position.floor()
            weight = (position - below).float()
            below = below.long()
            crops = self._samples(item, below) * (1 - weight) + self._samples(item, below + 1) * weight
        low, high = self.gain_db
        gain = 10.0 ** ((low + draws[1] * (high - low)) / 20.0) / 32768.0
        crops = crops * gain.float()[:, None]
        if self.augment.enabled:  # drawn last, and only then
            crops = self.augment(crops, generator)
        peak = crops.abs().amax(dim=1, keepdim=True)
        crops = crops * torch.where(peak > 0.99, 0.99 / peak.clamp_min(1e-12), torch.ones_like(peak))
        return Batch(crops[:, None], epoch, index)

    def _samples(self, item: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Samples `position` `[B, n]` of files `item` `[B]` as float32, zero outside each file."""
        length, offset = self.lengths[item][:, None], self.offsets[item][:, None]
        inside = (position >= 0) & (position < length)
        return self.audio[offset + position.clamp(min=0).minimum(length - 1)].float() * inside

    def iterate(self, epoch: int, batch: int) -> Iterator[Batch]:
        """Endless batches from data position (epoch, batch) on."""
        while True:
            for index in range(batch, self.batches_per_epoch):
                yield self.batch(epoch, index)
            epoch, batch = epoch + 1, 0

    def next_position(self, epoch: int, batch: int) -> tuple[int, int]:
        """The data position after batch `batch` of `epoch`."""
        return (epoch, batch + 1) if batch + 1 < self.batches_per_epoch else (epoch + 1, 0)

    def _generator(self, *key: int) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, *key]).generate_state(2, np.uint32)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)
        return generator


class Progress:
    """Passes a `DeviceCorpus`'s batches on to the trainer and prints speed and memory every `every` seconds."""

    def __init__(self, corpus: DeviceCorpus, trainer: Trainer, every: float = REPORT_SECONDS):
        self.corpus, self.trainer, self.every = corpus, trainer, every
        self.seconds_per_batch = corpus.batch_size * corpus.segment_samples / trainer.model.sample_rate
        self.steps, self.busy = 0, 0.0  # over the whole session, for the summary

    def iterate(self, epoch: int, batch: int) -> Iterator[Batch]:
        last_time, last_steps = time.monotonic(), 0
        previous = None
        for count, item in enumerate(self.corpus.iterate(epoch, batch)):
            now = time.monotonic()
            if previous is not None:  # asking for this batch means the previous step is done
                self.steps += 1
                self.busy += now - previous
            previous = now
            if now - last_time >= self.every:
                rate = (count - last_steps) / (now - last_time)
                print(
                    f"step {self.trainer.step}: {rate:.2f} steps/s, {rate * self.seconds_per_batch:.0f} s of "
                    f"audio/s, {memory(self.corpus.device)}",
                    file=sys.stderr,
                    flush=True,
                )
                last_time, last_steps = now, count
            yield item

    def batch(self, epoch: int, index: int) -> Batch:
        """A batch outside the run's order (codebook draws, the EMA's calibration), not counted as a step."""
        return self.corpus.batch(epoch, index)

    def next_position(self, epoch: int, batch: int) -> tuple[int, int]:
        return self.corpus.next_position(epoch, batch)

    def use_data(self, data: DataConfig) -> None:
        self.corpus.use_data(data)


def memory(device: torch.device) -> str:
    """Peak device memory (CUDA) or peak resident memory of this process (CPU), as text."""
    if device.type == "cuda":
        return (
            f"GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak allocated, "
            f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved"
        )
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def publish(checkpoint: Path, out: Path, model_id: str) -> None:
    """The exported model (float16) and the portable checkpoint of `checkpoint`, into `out`."""
    export(checkpoint, out / "model", model_id, dtype=torch.float16)
    save_portable(checkpoints.load_checkpoint(checkpoint), out, ema_dir=out / "model")


def out_problems(out: Path) -> list[str]:
    """What would keep OUT from coming back whole from a machine that returns at most 8 files of 16 MiB."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{p} is {p.stat().st_size / 2**20:.1f} MiB" for p in files if p.stat().st_size > MAX_FILE_BYTES]
    if len(files) > OUT_FILES:
        problems.append(f"{out} holds {len(files)} files")
    total = sum(p.stat().st_size for p in files)
    if total > OUT_BYTES:
        problems.append(f"{out} holds {total / 2**20:.1f} MiB")
    return problems


def prepare(args: argparse.Namespace) -> tuple[Trainer, Path]:
    """The config (the bundle's, then the flags and overrides), the work folder, and a trainer that resumes
    from the work folder or, when OUT holds a later portable checkpoint, from OUT."""
    bundle = Path(args.bundle).resolve()
    read_bundle(bundle)
    cfg = load_config(bundle / "config.yaml", args.overrides)
    cfg.data.train, cfg.data.dev = str(bundle / "train.csv"), str(bundle / "dev.csv")
    if cfg.data.dev_ood:  # the bundle's own manifest, relative to the bundle
        cfg.data.dev_ood = str(bundle / cfg.data.dev_ood)
    cfg.data.num_workers, cfg.data.cache = 0, False
    if args.device:
        cfg.device = args.device
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    cfg.data.batch_size = args.batch_size or (CUDA_BATCH if cuda else cfg.data.batch_size)
    if cfg.init_from and (bundle / cfg.init_from).exists():
        cfg.init_from = str(bundle / cfg.init_from)
    # One checkpoint and one dev pass at the end of each `fit` (a chunk of `--checkpoint-minutes`) only.
    cfg.ckpt_every = cfg.steps + 1
    cfg.eval_every = cfg.steps + 1 if cfg.eval_every > 0 else 0

    out = Path(args.out)
    work = Path(args.work) if args.work else default_work(out)
    portable = out / PORTABLE
    if portable.is_file():
        saved_step = json.loads(portable.read_text(encoding="utf-8"))["step"]
        local = checkpoints.latest_checkpoint(work / "checkpoints")
        if local is None or checkpoints.load_checkpoint(local)["step"] < saved_step:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)  # older than OUT: start from OUT
            cfg.init_from = str(portable.resolve())
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Trainer(cfg, work), out


def default_work(out: Path) -> Path:
    """Where full checkpoints and logs of the run writing to `out` go: a folder in the temporary directory."""
    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "simvq-bundle-run" / key


def run(args: argparse.Namespace, started: float | None = None) -> int:
    """Train as `args` say (see `training.bundle_args`); `--minutes` count from `started`
    (`time.monotonic()`, default now: the libraries are loaded by then, a few seconds after the start)."""
    started = time.monotonic() if started is None else started
    deadline = started + 60.0 * args.minutes
    trainer, out = prepare(args)
    cfg, device = trainer.cfg, trainer.device
    if trainer.resumed_from:
        print(f"resuming from {trainer.resumed_from} at step {trainer.step}", file=sys.stderr)
    began = time.monotonic()
    corpus = DeviceCorpus(
        trainer.dataset.items,
        trainer.repeats,
        trainer.model.sample_rate,
        cfg.data.segment_samples,
        cfg.data.gain_db,
        cfg.seed,
        cfg.data.batch_size,
        device,
        args.workers,
        cfg.data.speed,
        cfg.data.augment,
    )
    print(
        f"decoded {corpus.seconds / 3600:.2f} h of audio ({corpus.audio.numel() * 2 / 2**20:.0f} MiB of int16) "
        f"onto {device} in {time.monotonic() - began:.1f} s; batch {cfg.data.batch_size} x "
        f"{cfg.data.segment_samples / trainer.model.sample_rate:g} s",
        file=sys.stderr,
        flush=True,
    )
    progress = Progress(corpus, trainer)
    trainer.batches = progress

    signalled = []
    previous = signal.signal(signal.SIGTERM, lambda *_: signalled.append(True))
    reserve = min(60.0, 0.1 * 60.0 * args.minutes)  # for the last checkpoint and export, until measured
    chunk = min(30.0, 60.0 * args.checkpoint_minutes)  # a short first chunk measures speed and save time
    start_step, published = trainer.step, False
    try:
        while trainer.step < cfg.steps and not signalled:
            left = deadline - time.monotonic() - reserve
            if left <= 1.0:
                break
            length = min(left, chunk)
            cfg.max_minutes = (trainer.elapsed + length) / 60.0
            fit_began, step_before = time.monotonic(), trainer.step
            last = trainer.fit()
            publish(last, out, args.model_id)
            published = True
            overhead = time.monotonic() - fit_began - length
            reserve = max(5.0, 2.0 * overhead)
            if trainer.step < cfg.steps and trainer.elapsed < 60.0 * cfg.max_minutes:
                break  # the trainer stopped on SIGTERM (its own handler), after its checkpoint
            if progress.busy > 0 and trainer.step > step_before:
                rate = progress.steps / progress.busy
                cfg.log_every = max(1, round(rate * REPORT_SECONDS))  # a loss line about as often as a speed line
            chunk = 60.0 * args.checkpoint_minutes
    finally:
        signal.signal(signal.SIGTERM, previous)

    if not published:
        last = checkpoints.latest_checkpoint(trainer.ckpt_dir)
        if last is None:
            raise CodecError(
                f"--minutes {args.minutes:g} left no time to train after {time.monotonic() - started:.0f} "
                "s of start-up: give more minutes"
            )
        publish(last, out, args.model_id)
    rate = progress.steps / progress.busy if progress.busy else 0.0
    print(
        f"trained steps {start_step}-{trainer.step} in {time.monotonic() - started:.0f} s: {rate:.2f} steps/s, "
        f"{rate * progress.seconds_per_batch:.0f} s of audio/s, {memory(device)}",
        file=sys.stderr,
    )
    sizes = ", ".join(
        f"{p.relative_to(out)} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(out.rglob("*")) if p.is_file()
    )
    print(f"{out}: {sizes}", file=sys.stderr)
    for problem in out_problems(out):
        print(
            f"warning: {problem}: more than a machine returning {OUT_FILES} files of "
            f"{MAX_FILE_BYTES // 2**20} MiB ({OUT_BYTES // 2**20} MiB in all) gives back",
            file=sys.stderr,
        )
    print(f"model: --model {out / 'model'}; continue on a CPU: simvq-codec train ... init_from={out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    from codec.cli import parse_command_line

    parser = argparse.ArgumentParser(prog="python -m training.bundle_run", description=__doc__.splitlines()[0])
    add_bundle_run_arguments(parser)
    args = parse_command_line(parser, sys.argv[1:] if argv is None else argv)
    try:
        return run(args, started)
    except CodecError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
