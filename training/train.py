"""The training loop: one CPU, one GPU or many (torchrun + DDP); resumes exactly from its checkpoints."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from codec.checkpoint import load_model_dir
from codec.errors import CheckpointError
from codec.model import SimVQCodec
from codec.modules import ConvNeXtBlock
from training import checkpoints
from training.config import ConfigError, DataConfig, TrainConfig, config_from_dict, dump_config, with_phase
from training.data import (
    AudioDataset,
    Batch,
    EpochBatchSampler,
    collate,
    dev_clips,
    load_dev_ood,
    load_items,
    split_items,
)
from training.dev import evaluate
from training.discriminators import Discriminators
from training.ema import EMA
from training.losses import (
    ComplexSTFTLoss,
    LinearSTFTLoss,
    MultiScaleMelLoss,
    SpectrumLoss,
    discriminator_loss,
    feature_loss,
    generator_loss,
)
from training.monitor import Monitor
from training.phases import PhaseSpan, adversarial_steps_before, is_adversarial, phase_spans, span_at
from training.pitch import pitch_loss, yin_f0
from training.schedule import lr_factor


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: TrainConfig) -> Distributed:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = _use_cuda(cfg)
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


class Trainer:
    """Generator (the codec), discriminators, EMA, optimisers, data and reporting for one process.

    A new trainer resumes from the latest checkpoint in `run_dir/checkpoints` when there is one. The step
    says which of the run's phases it trains (`phase`, whose config is `phase_cfg`: `cfg` with the phase's
    overrides).

    Args:
        cfg: the run's configuration.
        run_dir: checkpoints, `config.yaml`, TensorBoard logs and JSON lines logs go here.
        world: this process's place in a distributed job.
        batches: where training batches come from: None for a DataLoader over `data.train`, or an object
            with `iterate(epoch, batch)` (endless `Batch`es from that data position), `next_position(epoch,
            batch)` and `use_data(data)` (the crop settings of a new phase's `DataConfig`), as
            `training.bundle_run.DeviceCorpus` (crops drawn on the device). Settable later.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, world: Distributed = Distributed(), batches: Any = None):
        self.cfg, self.world, self.batches = cfg, world, batches
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = torch.device(f"cuda:{world.local_rank}" if _use_cuda(cfg) else "cpu")
        self.amp_dtype = _amp_dtype(cfg, self.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)

        _seed_all(cfg.seed)  # identical initial weights (and frozen codebooks) on every rank
        try:
            model = SimVQCodec(**cfg.model)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None
        if cfg.data.segment_samples % model.hop_length:
            raise ConfigError(
                f"data.segment_samples={cfg.data.segment_samples} must be a multiple of the hop ({model.hop_length})"
            )
        self.model = model.to(self.device).train()
        d = cfg.disc
        self.disc = Discriminators(d.periods, d.mpd_channels, d.resolutions, d.mrd_channels, d.norm).to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.mel_loss = MultiScaleMelLoss(model.sample_rate, cfg.loss.mel_n_ffts, cfg.loss.mel_n_mels).to(self.device)
        self.complex_loss = ComplexSTFTLoss(cfg.loss.complex_n_ffts, cfg.loss.complex_hops, cfg.loss.complex_power)
        self.complex_loss.to(self.device)
        self.linear_loss = LinearSTFTLoss(cfg.loss.linear_n_ffts).to(self.device)
        self.spectrum_loss = SpectrumLoss(model.synthesis).to(self.device)
        o = cfg.optim
        self.gen_opt = torch.optim.AdamW(
            _param_groups(self.model, o.codebook_lr_scale), o.lr, o.betas, weight_decay=o.weight_decay
        )
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), o.disc_lr, o.betas, weight_decay=o.weight_decay)
        fp16 = self.amp_dtype == torch.float16
        self.gen_scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.disc_scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.gen, self.disc_ddp = self.model, self.disc
        if world.enabled:
            ids = [world.local_rank] if self.device.type == "cuda" else None
            # Buffers (frozen codebooks, init flags) are identical by construction: no per-step broadcast.
            self.gen = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)
            self.disc_ddp = DistributedDataParallel(self.disc, device_ids=ids, forward_sync_buffers=False)

        self.step = 0
        self.skipped = {"gen": 0, "disc": 0}
        self.data_position = (0, 0)
        self.elapsed = 0.0
        self._build_data()
        self.spans = phase_spans(cfg)
        self.resumed_from = self._resume()
        if self.resumed_from is None:
            _seed_all(cfg.seed + 1 + world.rank)  # per-rank randomness (quantizer dropout) from here on
        self._stop_requested = False
        self.phase: PhaseSpan | None = None
        self.phase_cfg = cfg
        self._enter_phase()

    # --- data ----------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg, model = self.cfg.data, self.model
        train, dev = split_items(load_items(cfg.train), load_items(cfg.dev) if cfg.dev else None, cfg.dev_fraction)
        self.dataset, self.dataset_data = self._dataset(train, cfg), cfg
        self.repeats = self.dataset.slots_per_item()
        self.corpus = {
            "train": str(cfg.train),
            "dev": str(cfg.dev) if cfg.dev else "speaker split of train",
            "train_files": len(train),
            "train_speakers": len({i.speaker for i in train}),
            "train_hours": _hours(train),
            "dev_files": len(dev),
            "dev_speakers": sorted({i.speaker for i in dev}),
            "dev_hours": _hours(dev),
        }
        ood = load_dev_ood(cfg.dev_ood) if cfg.dev_ood else []
        if ood:
            self.corpus |= {"dev_ood": str(cfg.dev_ood), "dev_ood_files": len(ood)}
        self.dev_clips: list[torch.Tensor] = []
        self.dev_ood_clips: list[torch.Tensor] = []  # of the out-of-domain dev set, where the run has one
        if self.world.is_main and self.cfg.eval_every > 0:
            rate, hop = model.sample_rate, model.hop_length
            self.dev_clips = dev_clips(dev, rate, hop, cfg.dev_clips, cfg.dev_clip_samples)
            if ood:
                self.dev_ood_clips = dev_clips(ood, rate, hop, cfg.dev_clips, cfg.dev_clip_samples)

    def _dataset(self, items: list, data: DataConfig) -> AudioDataset:
        """The training examples of `items` as `data` crops them."""
        return AudioDataset(
            items,
            self.model.sample_rate,
            data.segment_samples,
            data.gain_db,
            self.cfg.seed,
            data.cache,
            data.speed,
            data.augment,
        )

    # --- phases --------------------------------------------------------------------------------------
    def _enter_phase(self) -> PhaseSpan:
        """Switch to the phase that trains the current step, if it is not the current one: its training-only
        model options, optimiser settings and crop settings take effect (its learning rates, loss weights and
        adversary follow `phase_cfg` step by step)."""
        span = span_at(self.spans, self.step)
        if span == self.phase:
            return span
        self.phase = span
        self.phase_cfg = cfg = with_phase(self.cfg, self.cfg.phases[span.index]) if self.cfg.phases else self.cfg
        config = self.model.config
        self.model.quantizer.set_training(**{k: cfg.model.get(k, config[k]) for k in SimVQCodec.TRAINING_OPTIONS})
        o = cfg.optim
        for optimizer in (self.gen_opt, self.disc_opt):
            for group in optimizer.param_groups:
                group["betas"], group["weight_decay"] = o.betas, o.weight_decay
        self.gen_opt.param_groups[1]["lr_scale"] = o.codebook_lr_scale
        if cfg.data != self.dataset_data:
            self.dataset, self.dataset_data = self._dataset(self.dataset.items, cfg.data), cfg.data
        return span

    def _side_batches(self, epoch: int, count: int) -> Iterator[torch.Tensor]:
        """`count` batches of training crops `[B, 1, T]` of an epoch of their own (`DRAW_EPOCH`,
        `CALIBRATION_EPOCH`): the run's data order is not touched, and a resumed run gets the same crops."""
        if self.batches is not None:
            yield from (self.batches.batch(epoch, index).audio for index in range(count))
            return
        batch_size = self.cfg.data.batch_size
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.dataset))
        for index in range(count):
            slots = range(index * batch_size, (index + 1) * batch_size)
            keys = [(epoch, index, int(order[slot % len(order)]), slot) for slot in slots]
            yield torch.stack([self.dataset.crop(key) for key in keys])

    @torch.no_grad()
    def _draw_codebooks(self, which: str) -> None:
        """Draw the frozen codes of the new stages (`which="new"`), of all of them, or every stage's unused
        codes (`"unused"`) from their inputs: the latents of training crops of an epoch of their own
        (`DRAW_EPOCH`, so the run's data order is not touched), at least twice as many frames as the codebooks
        drawn hold together, and `UNUSED_FRAMES_PER_CODE` times the largest to tell which codes are unused.
        Every process draws the same."""
        quantizer = self.model.quantizer
        stages = [i for i, s in enumerate(quantizer.stages) if which in ("all", "unused") or not bool(s.initialized)]
        if not stages:
            return
        sizes = [quantizer.codebook_sizes[i] for i in stages]
        # Unused: enough frames per code to tell; drawn: each stage's codes leave the pool (`draw_codebooks`).
        frames = max(UNUSED_FRAMES_PER_CODE * max(sizes) if which == "unused" else 2 * sum(sizes), 10_000)
        per_batch = self.cfg.data.batch_size * (self.cfg.data.segment_samples // self.model.hop_length)
        batches = self._side_batches(DRAW_EPOCH, -(-frames // per_batch))
        latents = [self.model.encode_latents(audio.to(self.device)).float() for audio in batches]
        z = torch.cat(latents).reshape(-1, latents[0].shape[-1])
        generator = torch.Generator(device=z.device).manual_seed(self.cfg.seed)
        drawn = quantizer.draw_codebooks(z, stages, generator, unused_only=which == "unused")
        self.ema.model.quantizer.load_state_dict(quantizer.state_dict())  # the average starts from the new codes
        if self.world.is_main and which == "unused":
            counts = ", ".join(f"{n}/{quantizer.codebook_sizes[i]}" for i, n in enumerate(drawn))
            print(f"redrew the codes no frame of {z.shape[0]} selects, per stage: {counts}", file=sys.stderr)
        elif self.world.is_main:
            print(
                f"drew the codes of stage(s) {', '.join(str(i + 1) for i in stages)} from {z.shape[0]} frames",
                file=sys.stderr,
            )

    def _loader(self) -> tuple[Iterable[Batch], Any]:
        """Batches from the data position on, and the object whose `next_position` follows them."""
        cfg = self.cfg.data
        epoch, batch = self.data_position
        if self.batches is not None:
            return self.batches.iterate(epoch, batch), self.batches
        sampler = EpochBatchSampler(
            self.repeats, cfg.batch_size, self.cfg.seed, self.world.rank, self.world.world_size, epoch, batch
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
            worker_init_fn=_worker_init,
            generator=torch.Generator(),  # keeps DataLoader seeding off the global RNG that resume restores
        )
        return loader, sampler

    # --- one step ------------------------------------------------------------------------------------
    def train_step(self, audio: torch.Tensor) -> dict[str, float]:
        """One discriminator update (in an adversarial phase) and one generator update on `audio` [B, 1, T]."""
        if not self.phase.start <= self.step < self.phase.end:
            self._enter_phase()
        cfg = self.phase_cfg
        weights = cfg.loss.weights
        audio = audio.to(self.device, non_blocking=True)
        adversarial = is_adversarial(cfg)
        lr_gen, lr_disc = self._set_learning_rates()
        scalars: dict[str, Any] = {"lr/gen": lr_gen, "lr/disc": lr_disc if adversarial else 0.0}

        f0 = self._pitch_inputs(audio) if self.model.pitch_head is not None else None
        with self._autocast():
            out = self.gen(audio, f0=None if f0 is None else f0[0])
        # The last `decoder_delay` samples need frames past the crop's end (a fade-out): not a target.
        complete = audio.shape[-1] - self.model.decoder_delay
        full_audio = audio  # the spectrum's frames all lie inside the crop
        audio, output = audio[..., :complete], out.audio.float()[..., :complete]

        if adversarial:
            real_win, fake_win = self._disc_windows(audio, output)
            n = audio.shape[0]
            with self._autocast():
                d = self.disc_ddp(torch.cat([real_win, fake_win.detach()]))
            d_loss = discriminator_loss([x[:n] for x in d.logits], [x[n:] for x in d.logits], cfg.loss.adv_loss)
            ok, norm = self._update(d_loss, self.disc_opt, self.disc_scaler, self.disc, cfg.optim.disc_grad_clip)
            self.skipped["disc"] += not ok
            scalars.update({"adv/disc": d_loss.detach(), "grad_norm/disc": norm})

        terms = {"mel": self.mel_loss(output, audio)}
        if weights["stft/complex"] > 0:
            terms["stft/complex"] = self.complex_loss(output, audio)
        if weights["stft/linear"] > 0:
            terms["stft/linear"] = self.linear_loss(output, audio)
        if weights["spec/mag"] > 0 or weights["spec/phase"] > 0:
            terms.update(self.spectrum_loss(out.spectrum, full_audio))
        if f0 is not None:
            terms.update(pitch_loss(out.f0_logits, out.voicing_logit, self.model.pitch_head.bin_log_f0, *f0[1:]))
        terms["vq/commit"] = out.commit_loss.float()
        terms["vq/codebook"] = out.codebook_loss.float()
        if weights["vq/residual"] > 0:
            terms["vq/residual"] = out.residual_loss.float()
        if adversarial:
            self.disc.requires_grad_(False)  # gradients flow to the generator only
            with self._autocast():
                fake = self.disc(fake_win)
                with torch.no_grad():
                    real = self.disc(real_win)
            self.disc.requires_grad_(True)
            terms["adv/gen"] = generator_loss(fake.logits, cfg.loss.adv_loss)
            terms["adv/feat"] = feature_loss(real.features, fake.features)
        total = sum(weights[k] * v for k, v in terms.items())
        ok, norm = self._update(total, self.gen_opt, self.gen_scaler, self.model, cfg.optim.grad_clip)
        if ok:
            self.ema.update(self.model)
        self.skipped["gen"] += not ok
        self.step += 1

        scalars.update({k: v.detach() for k, v in terms.items()})
        scalars.update({"total": total.detach(), "grad_norm/gen": norm})
        scalars.update({"skipped/gen": self.skipped["gen"], "skipped/disc": self.skipped["disc"]})
        return {k: float(v) for k, v in scalars.items()}

    def _pitch_inputs(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input's pitch track per synthesis sub-frame -> (the harmonic prior's f0 for the forward pass:
        the track for a `pitch_teacher_forcing` share of the examples, NaN (the head's own) for the rest;
        the target f0; the target voicing)."""
        syn = self.model.synthesis
        f0, voiced = yin_f0(audio[:, 0], self.model.sample_rate, syn.n_fft, syn.hop)
        teacher = torch.rand(audio.shape[0], 1, device=audio.device) < self.phase_cfg.loss.pitch_teacher_forcing
        return torch.where(teacher, f0, torch.full_like(f0, float("nan"))), f0, voiced

    def _disc_windows(self, audio: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same random window of each real and generated crop (`disc.window_samples`), or the crops."""
        window, length = self.cfg.disc.window_samples, audio.shape[-1]
        if window <= 0 or window >= length:
            return audio, output
        starts = torch.randint(0, length - window + 1, (audio.shape[0], 1, 1))  # CPU RNG, restored on resume
        index = (starts + torch.arange(window)).to(audio.device)
        return audio.gather(-1, index), output.gather(-1, index)

    def _update(self, loss, optimizer, scaler, module, clip: float) -> tuple[bool, float]:
        """Backward, unscale, clip; step only if the loss and the gradient norm are finite on every rank."""
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), clip if clip > 0 else float("inf"))
        finite = (torch.isfinite(loss.detach()) & torch.isfinite(norm)).to(torch.int32)
        if self.world.enabled:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        ok = bool(finite)
        if ok:
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return ok, float(norm)

    def _set_learning_rates(self) -> tuple[float, float]:
        """The phase's schedule: the generator's from its start, the discriminators' from its first
        adversarial step."""
        o, span = self.phase_cfg.optim, self.phase

        def factor(start: int) -> float:
            step, total = max(0, self.step - start), max(1, span.schedule_end - start)
            return lr_factor(step, total, o.warmup_steps, o.decay, o.min_lr_ratio, o.gamma)

        gen, disc = o.lr * factor(span.schedule_start), o.disc_lr * factor(span.adv_start)
        for optimizer, lr in ((self.gen_opt, gen), (self.disc_opt, disc)):
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        return gen, disc

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> Path | None:
        """Train until `cfg.steps` (or step `until`, the time limit, SIGTERM); returns the last checkpoint.

        Stopping early (`until`, time limit, SIGTERM) writes a checkpoint, so a later `fit` resumes there; so
        does the end of each phase, after a dev pass."""
        cfg = self.cfg
        end = cfg.steps if until is None else min(until, cfg.steps)
        monitor = None
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
            monitor = Monitor(self.run_dir, cfg.steps, self.step, cfg.log_every, self.model.sample_rate)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        started = time.monotonic() - self.elapsed
        last_ckpt = checkpoints.latest_checkpoint(self.ckpt_dir) if self.world.is_main else None
        try:
            stop = False
            while self.step < end and not stop:
                span = self._enter_phase()
                if monitor:
                    monitor.phase(span, len(self.spans), self.step)
                stop, last_ckpt = self._fit_phase(min(end, span.end), monitor, started, last_ckpt)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if monitor:
                monitor.close()
        return last_ckpt

    def _fit_phase(
        self, end: int, monitor: Monitor | None, started: float, last_ckpt: Path | None
    ) -> tuple[bool, Path | None]:
        """Train the current phase until step `end` (or a stop); returns (stopped, the last checkpoint)."""
        cfg = self.cfg
        if self.batches is not None:
            self.batches.use_data(self.phase_cfg.data)
        if self.step == self.phase.start and self.phase_cfg.draw_codebooks != "none":
            self._draw_codebooks(self.phase_cfg.draw_codebooks)
        loader, sampler = self._loader()
        batches = iter(loader)
        try:
            while self.step < end:
                batch = next(batches)
                scalars = self.train_step(batch.audio)
                self.data_position = sampler.next_position(batch.epoch, batch.index)
                self.elapsed = time.monotonic() - started
                stop = self._should_stop()
                if monitor:
                    monitor.step(self.step, scalars, self.phase.name)
                final = stop or self.step >= end
                dev_due = monitor and cfg.eval_every > 0 and (self.step % cfg.eval_every == 0 or final)
                if self.world.is_main and (dev_due or self.step % cfg.ckpt_every == 0 or final):
                    # only rank 0's EMA is scored and saved
                    calibration = self._side_batches(CALIBRATION_EPOCH, CALIBRATION_BATCHES)
                    self.ema.calibrate(audio.to(self.device) for audio in calibration)
                if dev_due:
                    model, mel, linear = self.ema.model, self.mel_loss, self.linear_loss
                    result = evaluate(model, self.dev_clips, mel, linear, cfg.dev_audio_samples, cfg.dev_stages)
                    ood_clips = self.dev_ood_clips
                    ood = evaluate(model, ood_clips, mel, linear, 0, cfg.dev_stages) if ood_clips else None
                    monitor.dev(self.step, result, self.dev_clips, mel, self.phase.name, ood)
                if self.step % cfg.ckpt_every == 0 or final:
                    last_ckpt = self.save() or last_ckpt
                if stop:
                    return True, last_ckpt
            return False, last_ckpt
        finally:
            del batches, loader

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    def _should_stop(self) -> bool:
        """Time limit or SIGTERM, agreed on by every rank so all stop after the same step."""
        stop = self._stop_requested or (self.cfg.max_minutes > 0 and self.elapsed >= 60 * self.cfg.max_minutes)
        if not self.world.enabled:
            return stop
        flag = torch.tensor([int(stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # --- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; RNG states of every rank (gathered on all ranks)."""
        rng = checkpoints.rng_state()
        if self.world.enabled:
            gathered: list[Any] = [None] * self.world.world_size
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model_config": self.model.config,  # every constructor argument, defaults included
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "disc": self.disc.state_dict(),
            "gen_opt": self.gen_opt.state_dict(),
            "disc_opt": self.disc_opt.state_dict(),
            "gen_scaler": self.gen_scaler.state_dict(),
            "disc_scaler": self.disc_scaler.state_dict(),
            "skipped": dict(self.skipped),
            "data_position": list(self.data_position),
            "rng": gathered,
            "world_size": self.world.world_size,
            "elapsed": self.elapsed,
            "corpus": self.corpus,
        }

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0); every rank must call this, for the RNG gather."""
        state = self.state_dict()
        if not self.world.is_main:
            return None
        return checkpoints.save_checkpoint(state, self.ckpt_dir, self.step, self.cfg.keep_last)

    def _resume(self) -> Path | None:
        path = checkpoints.latest_checkpoint(self.ckpt_dir) if self.world.is_main else None
        warm_start = path is None and bool(self.cfg.init_from)
        if warm_start and self.world.is_main:
            path = checkpoints.resolve_init(self.cfg.init_from)
        if self.world.enabled:
            box = [str(path) if path else None, warm_start]
            dist.broadcast_object_list(box, src=0)  # every rank resumes from the checkpoint rank 0 chose
            path, warm_start = (Path(box[0]) if box[0] else None), bool(box[1])
        if path is None:
            return None
        if path.is_dir():  # a released model: its weights only, a fresh optimiser, step 0
            self._start_from_release(path)
            return path
        state = checkpoints.load_checkpoint(path)
        saved = config_from_dict(state["config"])
        if saved.model != self.cfg.model and warm_start:
            warnings.warn(f"init_from {path}: model config {saved.model} -> {self.cfg.model}")
        elif saved.model != self.cfg.model:
            raise ConfigError(
                f"{path} was trained with model={saved.model}, this config says model={self.cfg.model}; "
                f"use a new --run-dir for a different model (init_from={path} starts it from this checkpoint)"
            )
        self.step = int(state["step"])
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.gen_opt.load_state_dict(state["gen_opt"])
            fresh_groups = _param_groups(self.model, self.cfg.optim.codebook_lr_scale)
            for group, fresh in zip(self.gen_opt.param_groups, fresh_groups):
                group["lr_scale"] = fresh["lr_scale"]  # the config's multiplier, not the checkpoint's
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} does not fit this generator: {str(e).splitlines()[0]}") from None
        try:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
            self.disc_scaler.load_state_dict(state["disc_scaler"])
        except (RuntimeError, ValueError) as e:
            if adversarial_steps_before(self.spans, self.step) > 0:
                raise CheckpointError(
                    f"{path}: its discriminators do not match disc.* of this config: {str(e).splitlines()[0]}"
                ) from None
            # Never trained yet (no adversarial phase so far): start them fresh.
            warnings.warn(f"{path}: discriminators differ from the config's; untrained so far, they start fresh")
        self.gen_scaler.load_state_dict(state["gen_scaler"])
        self.skipped = {k: int(v) for k, v in state["skipped"].items()}
        self.data_position = tuple(int(v) for v in state["data_position"])
        self.elapsed = float(state["elapsed"])
        rngs = state["rng"]
        if len(rngs) == self.world.world_size:
            checkpoints.set_rng_state(rngs[self.world.rank])
        else:  # a different number of processes: same data position, fresh per-rank randomness
            _seed_all(self.cfg.seed + 1 + self.world.rank + 7919 * self.step)
        return path

    def _start_from_release(self, model_dir: Path) -> None:
        released = load_model_dir(model_dir)
        changed = {k: v for k, v in self.cfg.model.items() if released.config.get(k) != v}
        if changed:
            warnings.warn(f"init_from {model_dir}: model config changed: {changed}")
        for target in (self.model, self.ema.model):
            load_grown(target, released.state_dict(), model_dir)


DRAW_EPOCH = 2**31 - 1
"""The epoch number of the crops whose latents codebooks are drawn from (`Trainer._draw_codebooks`)."""

CALIBRATION_EPOCH = 2**31 - 2
CALIBRATION_BATCHES = 16
"""The crops that the EMA's quantizer whitening is fitted to before every dev pass and checkpoint: 16
batches of an epoch of their own. Fitted to the one batch just trained on, the first stages chose their
codes by that batch's level and content, and the mel at 2 stages swung by up to 0.07 between checkpoints
while the all-stage mel moved by 0.005 (docs/history.md)."""

UNUSED_FRAMES_PER_CODE = 32
"""Frames per code of the largest codebook that `draw_codebooks: unused` counts code use over: a code that
training still uses is selected about this many times, so few in use are taken for unused."""

# Input projections whose inputs may grow at the end (features appended, `STFTFeatures(advances=True)`).
GROWABLE_INPUTS = ("encoder_in.0.weight",)


def _differs(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], key: str) -> bool:
    """Whether both hold `key` with different shapes."""
    return key in own and key in state and own[key].shape != state[key].shape


def _lookup_changed(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], stage: str) -> bool:
    """Whether the quantizer stage with key prefix `stage` searches in another space in `own` than in `state`:
    another lookup dimension, or maps on one side only (`code_dim=None` searches the latent itself), or
    whitening on one side only."""
    return any(
        (key in own) != (key in state) or _differs(own, state, key)
        for key in (stage + "in_proj.weight", stage + "whitener.cov")
    )


def _resized_stages(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Key prefixes of the quantizer stages whose codebook has another size in `own` than in `state`."""
    return tuple(
        key.removesuffix(name)
        for key in own
        for name in ("frozen_codebook", "codes")
        if key.startswith("quantizer.stages.") and key.endswith("." + name) and _differs(own, state, key)
    )


def load_grown(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `model`, which may have parts that `state` lacks: whole modules (a pitch head added
    to a released model) keep their fresh initialisation, and so does the codebook of a quantizer stage whose
    size changed (its maps into and out of the lookup space carry over, unless that space changed too: then
    the whole stage starts fresh); ConvNeXt blocks added at the end of a stack (a deeper decoder)
    start with a zero layer scale, and inputs appended to an input projection (`GROWABLE_INPUTS`) with zero
    weights, so the grown model computes what `state` did and the new parts learn from there. Anything else
    that does not fit is an error."""
    own = model.state_dict()
    state = dict(state)
    given_modules = {k.split(".")[0] for k in state}  # before any stage is dropped below
    resized = _resized_stages(own, state)
    relooked = [p for p in resized if _lookup_changed(own, state, p)]
    for prefix in relooked:  # another lookup space: the maps and the whitening start fresh too
        for key in [k for k in state if k.startswith(prefix)]:
            state.pop(key)
    for prefix in resized:  # a stage whose codebook changed size: a new C and W, searched as from scratch
        for name in ("frozen_codebook", "codes", "proj.weight", "proj.bias", "initialized"):
            state.pop(prefix + name, None)
    kept = [p.rstrip(".") for p in resized if p not in relooked]
    if kept:
        warnings.warn(f"init_from {source}: new codebooks, maps kept: {', '.join(kept)}")
    if relooked:
        fresh = ", ".join(p.rstrip(".") for p in relooked)
        warnings.warn(f"init_from {source}: new lookup space, whole stages fresh: {fresh}")
    for key in GROWABLE_INPUTS:
        old, new = state.get(key), own.get(key)
        if old is not None and new is not None and old.shape[0] == new.shape[0] and old.shape[1] < new.shape[1]:
            state[key] = torch.cat([old.to(new.dtype), new.new_zeros(new.shape[0], new.shape[1] - old.shape[1])], 1)
            warnings.warn(f"init_from {source}: {key} grows from {old.shape[1]} to {new.shape[1]} inputs (zero)")
    new_modules = {k.split(".")[0] for k in own} - given_modules
    new_blocks = [
        name
        for name, module in model.named_modules()
        if isinstance(module, ConvNeXtBlock)
        and name.split(".")[0] not in new_modules
        and not any(k.startswith(name + ".") for k in state)
    ]
    grown = [*sorted(new_modules), *new_blocks]  # blocks in stack order
    misfits = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    misfits += [k for k in own if k not in state and not k.startswith(tuple(g + "." for g in grown) + resized)]
    if misfits:
        raise CheckpointError(f"{source} does not fit this generator: {', '.join(misfits[:3])} differ")
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name in new_blocks:
            model.get_submodule(name).scale.zero_()
    if grown:
        warnings.warn(f"init_from {source}: new modules start fresh: {', '.join(grown)}")


def train(cfg: TrainConfig, run_dir: str | Path) -> Path | None:
    """Run (or resume) training in `run_dir`, alone or as one process of a torchrun job."""
    world = init_distributed(cfg)
    try:
        return Trainer(cfg, run_dir, world).fit()
    finally:
        if world.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _hours(items) -> float:
    return round(sum(item.duration or 0.0 for item in items) / 3600, 3)


def _use_cuda(cfg: TrainConfig) -> bool:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available")
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def _param_groups(model: SimVQCodec, codebook_lr_scale: float) -> list[dict[str, Any]]:
    """The generator's trained parameters, with the quantizer's codebooks in a group of their own learning rate
    (fixed ones, such as principal maps, are left out)."""
    codebook = {id(p) for stage in model.quantizer.stages for p in stage.codebook_parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    rest = [p for p in trained if id(p) not in codebook]
    books = [p for p in trained if id(p) in codebook]
    return [{"params": rest, "lr_scale": 1.0}, {"params": books, "lr_scale": codebook_lr_scale}]


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if cfg.precision in ("bf16", "fp16"):
            raise ConfigError(f"precision={cfg.precision} needs CUDA; use precision=auto or fp32 on the CPU")
        return None
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    # A stop signal sent to the whole process group (Ctrl-C, `pkill -f`, a job scheduler) is the main
    # process's to handle: it finishes the step and writes a checkpoint; a worker dying first would crash it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
