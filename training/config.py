"""Training configuration: dataclass defaults, YAML files and `key=value` overrides on top of them."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from codec.errors import CodecError

LOSS_KEYS = (
    "mel",
    "stft/complex",
    "stft/linear",
    "spec/mag",
    "spec/phase",
    "adv/gen",
    "adv/feat",
    "vq/commit",
    "vq/codebook",
    "vq/residual",
    "pitch/f0",
    "pitch/voicing",
)


class ConfigError(CodecError, ValueError):
    """A config file or override that names an unknown key or holds a value of the wrong type."""


@dataclass
class AugmentConfig:
    """Random changes to training crops, so they sound like what users send (`training.augment`).

    A crop is the codec's input and its target alike, so a change is learned as part of the signal: a band a
    change empties stays empty in the target. Each change has its own probability per crop; 0 (every default)
    turns it off, and with all of them 0 no random number is drawn, so runs without augmentation keep their
    crops.

    Args:
        band_prob: share of crops given a telephone band: a low-pass that removes everything above a cutoff
            drawn uniformly from `band_hz` (it falls from full level over the 200 Hz below the cutoff).
        band_hz: (low, high) range of the low-pass cutoff in Hz.
        highpass_prob: share of the band-limited crops that also lose everything below `highpass_hz`.
        highpass_hz: the high-pass cutoff in Hz (full level from 100 Hz above it).
        resample_prob: share of the band-limited crops that then make a round trip through 8 kHz (decimated
            and interpolated with a windowed-sinc filter), as audio that passed a telephone line does.
        eq_prob: share of crops given a mild equalisation: a smooth random tilt over log-frequency plus a
            shelf at a random corner (250 Hz to 4 kHz), together at most `eq_db` up or down at any frequency.
        eq_db: the equalisation's largest gain or cut in dB.
        noise_prob: share of crops with added white, pink or brown noise (equally likely), at a signal-to-noise
            ratio drawn uniformly from `noise_snr_db` (measured over the whole crop, before the band limit).
        noise_snr_db: (low, high) signal-to-noise ratio in dB.
        reverb_prob: share of crops played in a synthetic room: the direct path plus exponentially decaying
            noise whose level falls 60 dB in a reverberation time drawn uniformly from `reverb_rt60`.
        reverb_rt60: (low, high) reverberation time in seconds.
        reverb_drr_db: (low, high) direct-to-reverberant energy ratio in dB, uniform.
    """

    band_prob: float = 0.0
    band_hz: tuple[float, float] = (3400.0, 4000.0)
    highpass_prob: float = 0.5
    highpass_hz: float = 300.0
    resample_prob: float = 0.3
    eq_prob: float = 0.0
    eq_db: float = 4.0
    noise_prob: float = 0.0
    noise_snr_db: tuple[float, float] = (20.0, 50.0)
    reverb_prob: float = 0.0
    reverb_rt60: tuple[float, float] = (0.1, 0.6)
    reverb_drr_db: tuple[float, float] = (0.0, 15.0)

    @property
    def enabled(self) -> bool:
        """Whether any change can happen (only then are random numbers drawn for it)."""
        return max(self.band_prob, self.eq_prob, self.noise_prob, self.reverb_prob) > 0


@dataclass
class DataConfig:
    """Where the audio comes from and how training examples are cut from it.

    Args:
        train: manifest (CSV with a `path` column, or one path per line) or folder of wav/flac/ogg.
        dev: the same for the dev set; None splits `train` by speaker (whole voices go to dev).
        dev_ood: the same for a second dev set of speech unlike the corpus (`dev-ood.csv` of
            `training.corpus`), scored beside the dev set at every dev pass and logged apart; None: none.
        dev_fraction: share of speakers held out when `dev` is None (at least one).
        segment_samples: crop length at the model rate; a multiple of the model's hop.
        gain_db: random gain range in dB applied to each crop (the crop is kept below full scale).
        speed: range of a random speed factor per crop (log-uniform; pitch and formants move with it, as in
            Kaldi's speed perturbation); (1, 1) is off.
        augment: telephone band, equalisation, noise and reverberation (`AugmentConfig`), off by default.
        batch_size: examples per step on each process.
        num_workers: DataLoader worker processes (0 loads in the training process).
        cache: keep decoded int16 audio in memory (per process), good for corpora of a few hours.
        dev_clips: number of fixed dev clips scored at every evaluation (as many of `dev_ood`).
        dev_clip_samples: maximum length of a dev clip at the model rate (multiple of the hop).
    """

    train: str = "data/corpus/train.csv"
    dev: str | None = "data/corpus/dev.csv"
    dev_ood: str | None = None
    dev_fraction: float = 0.05
    segment_samples: int = 16000
    gain_db: tuple[float, float] = (-12.0, 0.0)
    speed: tuple[float, float] = (1.0, 1.0)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 16
    num_workers: int = 1
    cache: bool = True
    dev_clips: int = 32
    dev_clip_samples: int = 64000


@dataclass
class OptimConfig:
    """AdamW for generator and discriminator, linear warm-up then decay, gradient clipping.

    Args:
        lr: generator peak learning rate.
        disc_lr: discriminator peak learning rate.
        betas: AdamW betas (both optimisers).
        weight_decay: AdamW decoupled weight decay.
        warmup_steps: linear warm-up from 0 to the peak rate.
        decay: "cosine" (to `min_lr_ratio * lr` at the last step), "exponential" (`gamma` per step) or "none".
        min_lr_ratio: floor of the cosine decay, relative to the peak.
        gamma: per-step factor of the exponential decay.
        codebook_lr_scale: learning-rate multiplier of the quantizer's codebook parameters (SimVQ's linear
            layer W, or plain VQ's codes). W is a handful of parameters that must follow the encoder: at the
            base rate Adam moves each entry by about `lr` per step, far too slowly (docs/architecture.md).
        grad_clip: max global gradient norm of the generator (0 disables clipping).
        disc_grad_clip: the same for the discriminator.
    """

    lr: float = 3e-4
    disc_lr: float = 3e-4
    betas: tuple[float, float] = (0.8, 0.99)
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    decay: str = "cosine"
    min_lr_ratio: float = 0.05
    gamma: float = 0.999996
    codebook_lr_scale: float = 1.0
    grad_clip: float = 100.0
    disc_grad_clip: float = 10.0


@dataclass
class LossConfig:
    """Loss weights (the keys also name the logged scalars) and the spectral loss settings.

    Args:
        weights: weight of each generator loss term; keys are fixed (`LOSS_KEYS`), 0 disables a term.
        mel_n_ffts: FFT sizes of the multi-scale log-mel L1 (hop = n_fft / 4).
        mel_n_mels: mel bands per FFT size.
        complex_n_ffts: FFT sizes of the compressed complex STFT MSE.
        complex_hops: hops of the compressed complex STFT MSE.
        complex_power: magnitude compression exponent (|X|^p with the phase of X).
        linear_n_ffts: FFT sizes of "stft/linear", spectral convergence of linear magnitudes (hop = n_fft / 4).
        adv_loss: "hinge" or "lsgan" for generator and discriminator.
        pitch_teacher_forcing: with a pitch head, the share of training examples whose harmonic prior
            follows the input's pitch track (training.pitch) rather than the head's own estimate.
    The defaults are what the bundled model trained with.
    """

    weights: dict[str, float] = field(
        default_factory=lambda: {
            "mel": 15.0,
            "stft/complex": 0.0,  # asks for absolute phase, which propagated phase does not have
            "stft/linear": 10.0,
            "spec/mag": 15.0,
            "spec/phase": 15.0,
            "adv/gen": 1.0,
            "adv/feat": 2.0,
            "vq/commit": 0.25,
            "vq/codebook": 1.0,
            "vq/residual": 1.0,
            "pitch/f0": 1.0,  # these two apply only to a model with a pitch head (model.pitch_prior)
            "pitch/voicing": 1.0,
        }
    )
    mel_n_ffts: tuple[int, ...] = (256, 512, 1024, 2048)
    mel_n_mels: tuple[int, ...] = (32, 64, 80, 128)
    complex_n_ffts: tuple[int, ...] = (320, 640)
    complex_hops: tuple[int, ...] = (80, 160)
    complex_power: float = 0.3
    linear_n_ffts: tuple[int, ...] = (512, 1024, 2048)
    adv_loss: str = "hinge"
    pitch_teacher_forcing: float = 1.0


@dataclass
class DiscConfig:
    """Small multi-period and multi-resolution STFT discriminators (sized so they cost well under half a step).

    Args:
        periods: periods of the multi-period discriminator (empty disables it).
        mpd_channels: channels of the period discriminators' strided layers.
        resolutions: (n_fft, hop) of each STFT discriminator (empty disables them).
        mrd_channels: channels of the STFT discriminators.
        norm: "weight" or "spectral" normalisation of every conv.
        window_samples: the discriminators see a random window of this many samples of each crop
            (0: the whole crop); halving it halves their cost.
    """

    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    mpd_channels: tuple[int, ...] = (8, 16, 32, 64)
    resolutions: tuple[tuple[int, int], ...] = ((2048, 512), (1024, 256), (512, 128))
    mrd_channels: int = 64
    norm: str = "weight"
    window_samples: int = 4800


@dataclass
class Phase:
    """One stage of a run: `steps` generator steps trained with `overrides` on top of the run's config.

    Args:
        name: names the phase in the logs and in overrides of its keys (`phases.NAME.steps=2000`).
        steps: generator steps of the phase; a run with phases is as long as its phases together.
        restart_schedule: the learning rates warm up and decay again over this phase; false continues the
            schedule of the phase before, as one schedule over both.
        overrides: dotted keys and their values (`optim.lr`, `adv`, `model.quantize_fraction`); only keys that
            may change during a run (`phase_key_error`), never the model's shape.
    """

    name: str
    steps: int
    restart_schedule: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: name, steps, restart_schedule, then the overrides as nested sections."""
        out: dict[str, Any] = {"name": self.name, "steps": self.steps, "restart_schedule": self.restart_schedule}
        for key, value in self.overrides.items():
            *sections, name = key.split(".")
            node = out
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = _plain(value)
        return out


@dataclass
class TrainConfig:
    """Everything a run needs; the defaults are the source of truth, files and overrides change named keys.

    Args:
        model: keyword arguments of `codec.model.SimVQCodec` that differ from its defaults.
        data, optim, loss, disc: see their classes.
        steps: total generator steps; with `phases`, their sum.
        adv: train against the discriminators (with `loss.weights` of `adv/gen` or `adv/feat` above 0).
        draw_codebooks: at the first step of the run (or of the phase that sets it), draw the frozen codes of
            the quantizer's stages from their own inputs (`ResidualQuantizer.draw_codebooks`): "new" the
            stages that have not trained yet (a fresh model's, or a warm start's resized ones), "all" every
            stage, "unused" only the codes of every stage that no input selects (they move to where the stage
            quantizes worst), "none" keeps the Gaussian codes (rescaled to the input on the first batch).
        phases: the run's stages in order, each with its own steps and overrides (`Phase`), e.g. a first
            phase without the adversary; the learning-rate schedule restarts with each. Empty: the run is one
            phase of `steps` steps (named "train" in the logs).
        init_from: a checkpoint file or run directory to start from when `run_dir` has no checkpoint yet:
            weights, EMA, optimisers, step and data position carry over as on resume, but the model config
            may differ wherever the parameter shapes do not (e.g. `model.phase`). A released model (an
            installed id such as `simvq-16k`, or an exported directory) gives its weights only, from step 0.
            "" starts from scratch.
        ema_decay: decay of the generator's exponential moving average (export uses the EMA).
        seed: seeds weights, data order, crops and gains.
        log_every: steps between logged training scalars (and plain progress lines off a TTY).
        eval_every: steps between dev passes (0 disables them).
        ckpt_every: steps between checkpoints.
        keep_last: checkpoints kept on disk (plus the one `latest` names).
        max_minutes: stop (with a checkpoint) once the run's training time, summed over every resume, reaches
            this many minutes; 0 means no limit.
        precision: "auto" (bf16 on CUDA when supported, else fp16; fp32 on CPU), "fp32", "bf16" or "fp16".
        device: "auto", "cpu" or "cuda".
        dev_audio_samples: dev clips whose audio and mel image go to TensorBoard.
        dev_stages: stage counts at which each dev pass also takes the mel loss, besides all stages (by default
            2 and 5, the export rule's 1.5 and 3 kbit/s points); [] skips them.
        threads: torch intra-op threads per process (0 keeps torch's default).
    """

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    steps: int = 200_000
    adv: bool = True
    draw_codebooks: str = "none"
    phases: list[Phase] = field(default_factory=list)
    init_from: str = ""
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    eval_every: int = 1000
    ckpt_every: int = 1000
    keep_last: int = 3
    max_minutes: float = 0.0
    precision: str = "auto"
    device: str = "auto"
    dev_audio_samples: int = 3
    dev_stages: tuple[int, ...] = (2, 5)
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists instead of tuples) for YAML, JSON and checkpoints."""
        out = _plain(dataclasses.asdict(self))
        out["phases"] = [phase.to_dict() for phase in self.phases]
        if self.phases:
            del out["steps"]  # the phases' sum
        return out


CHOICES = {
    "optim.decay": ("cosine", "exponential", "none"),
    "loss.adv_loss": ("hinge", "lsgan"),
    "disc.norm": ("weight", "spectral"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "draw_codebooks": ("none", "new", "all", "unused"),
}


FIXED_DATA_KEYS = (
    "data.train",
    "data.dev",
    "data.dev_ood",
    "data.dev_fraction",
    "data.segment_samples",
    "data.batch_size",
    "data.num_workers",
    "data.cache",
    "data.dev_clips",
    "data.dev_clip_samples",
)
"""Data keys that hold for the whole run (the files, the batches and the dev set are laid out once); the
other data keys shape each crop and may change between phases."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file at `path` (if any), then `key=value` overrides (dotted keys)."""
    cfg = TrainConfig()
    given = []
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config {path} is not a YAML file (it is not UTF-8 text)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping of keys, not {type(data).__name__}")
        if "adv_start_step" in data:  # a run directory's config.yaml from before phases: resume it as it trained
            warnings.warn(f"{path}: adv_start_step is read as adv or phases; a new config says those")
            data = _before_phases(data)
        for key, value in _flatten(data):
            set_key(cfg, key, value)
            given.append(key)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
        set_key(cfg, key.strip(), yaml.safe_load(text) if text.strip() else "")
        given.append(key.strip())
    _sum_phases(cfg, "steps" in given)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved with `TrainConfig.to_dict()` (unknown keys are an error), also one saved before
    runs had phases."""
    data = _before_phases(data)
    cfg = TrainConfig()
    for key, value in _flatten(data):
        set_key(cfg, key, value)
    _sum_phases(cfg, "steps" in data)
    validate(cfg)
    return cfg


def with_phase(cfg: TrainConfig, phase: Phase) -> TrainConfig:
    """The config that `phase` trains with: `cfg` with the phase's overrides, and no phases of its own."""
    out = copy.deepcopy(cfg)
    out.phases = []
    for key, value in phase.overrides.items():
        set_key(out, key, value)
    return out


def phase_key_error(key: str) -> str | None:
    """Why a phase may not set the dotted `key` (said of the key: "holds for the whole run; ..."), or None when
    it may."""
    from codec.model import SimVQCodec

    options = [f"model.{name}" for name in SimVQCodec.TRAINING_OPTIONS]
    crop = [f"data.{f.name}" for f in dataclasses.fields(DataConfig) if f"data.{f.name}" not in FIXED_DATA_KEYS]
    if (
        key in ("adv", "draw_codebooks")
        or key.startswith(("optim.", "loss.weights.", "data.augment."))
        or key in ("loss.pitch_teacher_forcing", "loss.adv_loss", *options, *crop)
    ):
        return None
    if key.startswith("model."):
        return f"is part of the model that the whole run trains; a phase may set only {', '.join(options)}"
    return (
        f"holds for the whole run; a phase may set adv, draw_codebooks, optim.*, loss.weights.*, "
        f"loss.pitch_teacher_forcing, loss.adv_loss, {', '.join(options)}, {', '.join(crop)}"
    )


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set one dotted key (`optim.lr`, `loss.weights.mel`, `model.n_stages`), converting the value's type.

    A mapping value sets the keys of a section (`loss.weights={mel: 10}`)."""
    parts = key.split(".")
    if parts[0] == "phases":
        _set_phases(cfg, parts[1:], value, key)
        return
    if key == "adv_start_step":
        raise ConfigError(
            "adv_start_step is gone: set adv=false for a run without the adversary, or give the run "
            'phases, the first with adv: false (docs/training.md, "Phases")'
        )
    obj: Any = cfg
    for i, name in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{'.'.join(parts[:i])!r} is not a section: {key!r}")
        _check_field(obj, name, ".".join(parts[: i + 1]))
        obj = getattr(obj, name)
    name = parts[-1]
    if obj is cfg.model:
        _set_model_key(cfg.model, name, value)
    elif obj is cfg.loss.weights:
        if name not in LOSS_KEYS:
            raise ConfigError(f"unknown loss weight {key!r}; known: {', '.join(LOSS_KEYS)}")
        obj[name] = _coerce(value, float, key)
    elif not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{'.'.join(parts[:-1])!r} is not a section: {key!r}")
    else:
        _check_field(obj, name, key)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) or isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{key!r} is a section: give a mapping or set its keys one by one")
            for sub, v in _flatten(value, key):
                set_key(cfg, sub, v)
        else:
            setattr(obj, name, _coerce(value, typing.get_type_hints(type(obj))[name], key))


def validate(cfg: TrainConfig) -> None:
    """Check choices and ranges that a type alone cannot express."""
    names = [phase.name for phase in cfg.phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"phases: each phase needs a name of its own, got {', '.join(names)}")
    for phase in cfg.phases:
        if phase.steps < 1:
            raise ConfigError(f"phases.{phase.name}.steps must be at least 1, got {phase.steps}")
        try:
            validate(with_phase(cfg, phase))
        except ConfigError as e:
            raise ConfigError(f"phase {phase.name!r}: {e}") from None
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    augment = cfg.data.augment
    ranges = {"data.gain_db": cfg.data.gain_db}
    for f in dataclasses.fields(augment):
        key, value = f"data.augment.{f.name}", getattr(augment, f.name)
        if isinstance(value, tuple):
            ranges[key] = value
        elif f.name.endswith("_prob") and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} is a probability: give a value in [0, 1], got {value}")
    for key, (lo, hi) in ranges.items():
        if lo > hi:
            raise ConfigError(f"{key}=[{lo}, {hi}]: the low end is above the high end")
    if augment.reverb_rt60[0] <= 0 or min(augment.band_hz[0], augment.highpass_hz, augment.eq_db) < 0:
        raise ConfigError("data.augment: reverb_rt60 must be positive, band_hz, highpass_hz and eq_db at least 0")
    lo, hi = cfg.data.speed
    if not 0 < lo <= hi:
        raise ConfigError(f"data.speed=[{lo}, {hi}]: give 0 < low <= high (1 plays as recorded)")
    if len(cfg.loss.mel_n_ffts) != len(cfg.loss.mel_n_mels):
        raise ConfigError("loss.mel_n_ffts and loss.mel_n_mels must have the same length")
    if len(cfg.loss.complex_n_ffts) != len(cfg.loss.complex_hops):
        raise ConfigError("loss.complex_n_ffts and loss.complex_hops must have the same length")
    for key in ("steps", "data.batch_size", "data.segment_samples", "ckpt_every", "keep_last", "log_every"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {_get(cfg, key)}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if any(k < 1 for k in cfg.dev_stages):
        raise ConfigError(f"dev_stages are stage counts of at least 1, got {list(cfg.dev_stages)}")
    if not 0.0 < cfg.data.dev_fraction < 1.0:
        raise ConfigError(f"data.dev_fraction must be in (0, 1), got {cfg.data.dev_fraction}")


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the full config (every key, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def _set_phases(cfg: TrainConfig, parts: list[str], value: Any, key: str) -> None:
    """`phases` (the list) or `phases.NAME.KEY` (one key of the phase named NAME)."""
    if not parts:
        if value is None:
            cfg.phases = []
            return
        if not isinstance(value, list):
            raise ConfigError(f"phases must be a list of phases, each a mapping with a name and steps, got {value!r}")
        cfg.phases = [_parse_phase(item, i) for i, item in enumerate(value)]
        return
    name, *rest = parts
    phase = next((p for p in cfg.phases if p.name == name), None)
    if phase is None:
        known = ", ".join(p.name for p in cfg.phases) or "none"
        raise ConfigError(f"{key!r}: no phase named {name!r} (this config's phases: {known})")
    if not rest:
        raise ConfigError(f"{key!r}: name a key of the phase, e.g. phases.{name}.steps=1000")
    sub = ".".join(rest)
    items = _flatten(value, sub) if isinstance(value, dict) else [(sub, value)]
    for sub_key, sub_value in items:
        _set_phase_key(phase, sub_key, sub_value)


def _parse_phase(value: Any, index: int) -> Phase:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"phases[{index}] must be a mapping with a name and steps, got {value!r}")
    name = value["name"]
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"phases[{index}]: name {name!r} must be letters, digits, '-' or '_'")
    if "steps" not in value:
        raise ConfigError(f"phases[{index}] ({name}) needs steps")
    phase = Phase(name, 0)
    for key, item in _flatten({k: v for k, v in value.items() if k != "name"}):
        _set_phase_key(phase, key, item)
    return phase


def _set_phase_key(phase: Phase, key: str, value: Any) -> None:
    label = f"phases.{phase.name}.{key}"
    if key in ("steps", "restart_schedule"):
        setattr(phase, key, _coerce(value, int if key == "steps" else bool, label))
        return
    if key == "name":
        raise ConfigError(f"{label}: a phase is renamed in its entry of the phases list")
    if reason := phase_key_error(key):
        raise ConfigError(f"{label} {reason}")
    scratch = TrainConfig()
    try:
        set_key(scratch, key, value)  # checked and converted as at the top level
    except ConfigError as e:
        raise ConfigError(f"phases.{phase.name}: {e}") from None
    *sections, name = key.split(".")
    node: Any = scratch
    for section in sections:
        node = getattr(node, section)
    phase.overrides[key] = node[name] if isinstance(node, dict) else getattr(node, name)


def _sum_phases(cfg: TrainConfig, steps_given: bool) -> None:
    """A run with phases is as long as they are together (`steps`, where given, must say the same)."""
    if not cfg.phases:
        return
    total = sum(phase.steps for phase in cfg.phases)
    if steps_given and cfg.steps != total:
        raise ConfigError(
            f"steps={cfg.steps}, but the phases add up to {total}: a run with phases is as long as "
            "they are together; set phases.NAME.steps and leave steps out"
        )
    cfg.steps = total


def _before_phases(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved before runs had phases: its `adv_start_step` N becomes `adv` (N = 0: on; N >= steps: off),
    or a phase without the adversary and one with it on the same schedule, as such a run trained."""
    if "adv_start_step" not in data:
        return data
    data = dict(data)
    start, steps = int(data.pop("adv_start_step")), int(data.get("steps", TrainConfig.steps))
    if 0 < start < steps:
        del data["steps"]
        data["phases"] = [
            {"name": "reconstruction", "steps": start, "adv": False},
            {"name": "adversary", "steps": steps - start, "restart_schedule": False, "adv": True},
        ]
    else:
        data["adv"] = start <= 0
    return data


def _check_field(obj: Any, name: str, key: str) -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise ConfigError(f"unknown config key {key!r}; this section has: {', '.join(names)}")


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mapping -> dotted keys; model arguments are leaves even when their value is a mapping."""
    out = []
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, dict) and value and prefix != "model":
            out.extend(_flatten(value, key))
        else:
            out.append((key, value))
    return out


def _set_model_key(model: dict[str, Any], name: str, value: Any) -> None:
    """One `model.NAME`: an argument of SimVQCodec, or one it no longer takes where its value is the behaviour
    that remains (a config saved by an earlier version), which is dropped."""
    from codec.model import RETIRED_ARGUMENTS, upgrade_config

    if name not in RETIRED_ARGUMENTS:
        model[name] = _model_value(name, value)
        return
    try:
        upgraded = upgrade_config({**model, name: value})
    except ValueError as e:
        raise ConfigError(f"model.{name}: {e}") from None
    model.clear()
    model.update(upgraded)


def _model_value(name: str, value: Any) -> Any:
    """Check a model key against SimVQCodec's signature and convert to its default's type."""
    from codec.model import SimVQCodec

    params = dict(inspect.signature(SimVQCodec.__init__).parameters)
    params.pop("self")
    if name not in params:
        raise ConfigError(f"unknown model key 'model.{name}'; SimVQCodec takes: {', '.join(params)}")
    if params[name].default is inspect.Parameter.empty or value is None:
        return value
    return _coerce(value, typing.get_type_hints(SimVQCodec.__init__)[name], f"model.{name}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` (from YAML or the command line) to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if hint is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            out = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {'an integer' if hint is int else 'a number'}, got {value!r}") from None
        return out
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or hint is tuple else out
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _get(cfg: TrainConfig, key: str) -> Any:
    obj: Any = cfg
    for name in key.split("."):
        obj = getattr(obj, name)
    return obj


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
