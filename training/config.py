"""Training configuration: dataclass defaults, YAML files and `key=value` overrides on top of them."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from codec.errors import CodecError

LOSS_KEYS = (
    "mel", "stft/complex", "stft/linear", "spec/mag", "spec/phase", "adv/gen", "adv/feat",
    "vq/commit", "vq/codebook", "vq/residual", "pitch/f0", "pitch/voicing",
)


class ConfigError(CodecError, ValueError):
    """A config file or override that names an unknown key or holds a value of the wrong type."""


@dataclass
class DataConfig:
    """Where the audio comes from and how training examples are cut from it.

    Args:
        train: manifest (CSV with a `path` column, or one path per line) or folder of wav/flac/ogg.
        dev: the same for the dev set; None splits `train` by speaker (whole voices go to dev).
        dev_fraction: share of speakers held out when `dev` is None (at least one).
        segment_samples: crop length at the model rate; a multiple of the model's hop.
        gain_db: random gain range in dB applied to each crop (the crop is kept below full scale).
        speed: range of a random speed factor per crop (log-uniform; pitch and formants move with it, as in
            Kaldi's speed perturbation); (1, 1) is off.
        batch_size: examples per step on each process.
        num_workers: DataLoader worker processes (0 loads in the training process).
        cache: keep decoded int16 audio in memory (per process), good for corpora of a few hours.
        dev_clips: number of fixed dev clips scored at every evaluation.
        dev_clip_samples: maximum length of a dev clip at the model rate (multiple of the hop).
    """

    train: str = "data/corpus/train.csv"
    dev: str | None = "data/corpus/dev.csv"
    dev_fraction: float = 0.05
    segment_samples: int = 16000
    gain_db: tuple[float, float] = (-12.0, 0.0)
    speed: tuple[float, float] = (1.0, 1.0)
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
            base rate Adam moves each entry by about `lr` per step, far too slowly (docs/model-card.md).
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
    """

    weights: dict[str, float] = field(
        default_factory=lambda: {
            "mel": 15.0,
            "stft/complex": 5.0,
            "stft/linear": 0.0,
            "spec/mag": 0.0,
            "spec/phase": 0.0,
            "adv/gen": 1.0,
            "adv/feat": 2.0,
            "vq/commit": 0.25,
            "vq/codebook": 1.0,
            "vq/residual": 0.0,
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
    pitch_teacher_forcing: float = 0.0


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
class TrainConfig:
    """Everything a run needs; the defaults are the source of truth, files and overrides change named keys.

    Args:
        model: keyword arguments of `codec.model.SimVQCodec` that differ from its defaults.
        data, optim, loss, disc: see their classes.
        steps: total generator steps.
        adv_start_step: steps trained without the adversary (reconstruction and VQ losses only).
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
        threads: torch intra-op threads per process (0 keeps torch's default).
    """

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    steps: int = 200_000
    adv_start_step: int = 2000
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
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists instead of tuples) for YAML, JSON and checkpoints."""
        return _plain(dataclasses.asdict(self))


CHOICES = {
    "optim.decay": ("cosine", "exponential", "none"),
    "loss.adv_loss": ("hinge", "lsgan"),
    "disc.norm": ("weight", "spectral"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file at `path` (if any), then `key=value` overrides (dotted keys)."""
    cfg = TrainConfig()
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
        for key, value in _flatten(data):
            set_key(cfg, key, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
        set_key(cfg, key.strip(), yaml.safe_load(text) if text.strip() else "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved with `TrainConfig.to_dict()` (unknown keys are an error)."""
    cfg = TrainConfig()
    for key, value in _flatten(data):
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set one dotted key (`optim.lr`, `loss.weights.mel`, `model.n_stages`), converting the value's type.

    A mapping value sets the keys of a section (`loss.weights={mel: 10}`)."""
    parts = key.split(".")
    obj: Any = cfg
    for i, name in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{'.'.join(parts[:i])!r} is not a section: {key!r}")
        _check_field(obj, name, ".".join(parts[: i + 1]))
        obj = getattr(obj, name)
    name = parts[-1]
    if obj is cfg.model:
        obj[name] = _model_value(name, value)
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
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    lo, hi = cfg.data.gain_db
    if lo > hi:
        raise ConfigError(f"data.gain_db=[{lo}, {hi}]: the low end is above the high end")
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
    if not 0.0 < cfg.data.dev_fraction < 1.0:
        raise ConfigError(f"data.dev_fraction must be in (0, 1), got {cfg.data.dev_fraction}")


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the full config (every key, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


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


def _model_value(name: str, value: Any) -> Any:
    """Check a model key against SimVQCodec's signature and convert to its default's type."""
    from codec.model import SimVQCodec

    params = dict(inspect.signature(SimVQCodec.__init__).parameters)
    params.pop("self")
    if name not in params:
        raise ConfigError(f"unknown model key 'model.{name}'; SimVQCodec takes: {', '.join(params)}")
    default = params[name].default
    if default is inspect.Parameter.empty or default is None or value is None:
        return value
    hint = type(default)
    if isinstance(default, (list, tuple)):
        hint = list
    return _coerce(value, hint, f"model.{name}")


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
