"""Random changes that make training crops sound like what users send: room, equalisation, noise, phone line.

One implementation for both data paths: `AudioDataset` calls it on one CPU crop with a generator seeded from
that crop's own random numbers, `bundle_run.DeviceCorpus` on a whole batch on the GPU with the batch's
generator. The draws and the arithmetic are the same, so the two paths share every distribution.

Pitch has no change of its own: a pitch shift that keeps the duration is `data.speed` plus a time stretch,
the same spectra in every frame with stretch artefacts added (docs/training.md, "Data").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.config import AugmentConfig, ConfigError

PHONE_RATE = 8000  # Hz: the rate of the round trip
LOW_PASS_WIDTH_HZ = 200.0  # the low-pass falls from full level to nothing over this band below its cutoff
HIGH_PASS_WIDTH_HZ = 100.0  # the high-pass rises from nothing to full level over this band above its cutoff
TILT_FROM_HZ = 100.0  # the tilt runs linearly in log-frequency from here (-1) to the Nyquist frequency (+1)
SHELF_HZ = (250.0, 4000.0)  # range of the shelf's corner frequency, log-uniform
SHELF_OCTAVES = 0.5  # the shelf moves from -1 to +1 over about twice this many octaves about its corner
NOISE_FLOOR_HZ = 50.0  # pink and brown noise stay at this frequency's level below it (no subsonic rumble)
ZERO_CROSSINGS = 16  # of the round trip's windowed-sinc filter on each side (65 taps at 16 kHz)
KAISER_BETA = 8.0  # the filter's window: about 80 dB of stop band

_COLUMNS = (
    "band",
    "cutoff",
    "highpass",
    "resample",
    "eq",
    "tilt",
    "shelf",
    "shelf_hz",
    "noise",
    "snr",
    "colour",
    "reverb",
    "rt60",
    "drr",
)


@dataclass(frozen=True)
class Draws:
    """A batch's random choices, each [B]; a change is skipped for a crop whose flag (bool) is False.

    `colour` is 0 (white), 1 (pink) or 2 (brown): the noise's power falls as 1 / f^colour. `noise_seed` and
    `room_seed` seed the generators of the noise and of the rooms' reverberant tails: each change has its own,
    so turning one change on or off leaves the others' draws as they were (runs that differ in one change see
    the same crops otherwise).
    """

    band: torch.Tensor
    cutoff_hz: torch.Tensor
    highpass: torch.Tensor
    resample: torch.Tensor
    eq: torch.Tensor
    tilt_db: torch.Tensor
    shelf_db: torch.Tensor
    shelf_hz: torch.Tensor
    noise: torch.Tensor
    snr_db: torch.Tensor
    colour: torch.Tensor
    reverb: torch.Tensor
    rt60: torch.Tensor
    drr_db: torch.Tensor
    noise_seed: int
    room_seed: int


class Augmenter:
    """Applies `AugmentConfig`'s changes to a batch of crops [B, T], on the crops' device.

    The changes come in the order a recording meets them: the room (reverberation), the microphone
    (equalisation), background noise, then the phone line (band limits and the 8 kHz round trip). Equalisation,
    noise and band limits act on the crop's discrete Fourier transform (a circular filter, so the band above a
    cutoff holds exactly nothing); the room is a linear convolution (its tail stays within the crop).

    Args:
        cfg: the probabilities and ranges.
        sample_rate: the crops' rate in Hz.
    """

    def __init__(self, cfg: AugmentConfig, sample_rate: int):
        self.cfg, self.sample_rate = cfg, sample_rate
        nyquist = sample_rate / 2
        if cfg.band_prob > 0 and cfg.band_hz[1] > nyquist:
            raise ConfigError(
                f"data.augment.band_hz={list(cfg.band_hz)}: a cutoff above {nyquist:g} Hz, the "
                f"Nyquist frequency at {sample_rate} Hz, removes nothing"
            )
        if (
            cfg.band_prob * cfg.highpass_prob > 0
            and cfg.highpass_hz + HIGH_PASS_WIDTH_HZ > cfg.band_hz[0] - LOW_PASS_WIDTH_HZ
        ):
            raise ConfigError(
                f"data.augment.highpass_hz={cfg.highpass_hz:g} leaves no pass band below the "
                f"lowest cutoff in band_hz ({cfg.band_hz[0]:g} Hz)"
            )
        if cfg.band_prob * cfg.resample_prob > 0 and sample_rate % PHONE_RATE:
            raise ConfigError(
                f"data.augment.resample_prob: a round trip through {PHONE_RATE} Hz needs a model "
                f"rate that is a multiple of it, not {sample_rate} Hz"
            )
        self.room_samples = math.ceil(cfg.reverb_rt60[1] * sample_rate)  # the longest tail, 60 dB down at its end

    @property
    def enabled(self) -> bool:
        """Whether any change can happen; callers draw nothing when it is False."""
        return self.cfg.enabled

    def __call__(self, audio: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The crops `audio` [B, T] (float32) with changes drawn from `generator` (on their device)."""
        return self.apply(audio, self.draw(len(audio), generator))

    def draw(self, batch: int, generator: torch.Generator) -> Draws:
        """The random choices for `batch` crops: always the same numbers of draws, whatever is switched on."""
        device = generator.device
        u = torch.rand(batch, len(_COLUMNS), generator=generator, device=device, dtype=torch.float64)
        noise_seed, room_seed = torch.randint(2**62, (2,), generator=generator, device=device).tolist()
        column = {name: u[:, i] for i, name in enumerate(_COLUMNS)}
        cfg = self.cfg

        def uniform(name: str, low_high: tuple[float, float]) -> torch.Tensor:
            low, high = low_high
            return (low + (high - low) * column[name]).float()

        band = column["band"] < cfg.band_prob
        tilt, shelf = 2 * column["tilt"] - 1, 2 * column["shelf"] - 1
        scale = cfg.eq_db / (tilt.abs() + shelf.abs()).clamp_min(1.0)  # together at most eq_db anywhere
        return Draws(
            band=band,
            cutoff_hz=uniform("cutoff", cfg.band_hz),
            highpass=band & (column["highpass"] < cfg.highpass_prob),
            resample=band & (column["resample"] < cfg.resample_prob),
            eq=column["eq"] < cfg.eq_prob,
            tilt_db=(tilt * scale).float(),
            shelf_db=(shelf * scale).float(),
            shelf_hz=uniform("shelf_hz", tuple(math.log(f) for f in SHELF_HZ)).exp(),
            noise=column["noise"] < cfg.noise_prob,
            snr_db=uniform("snr", cfg.noise_snr_db),
            colour=(column["colour"] * 3).long().clamp(max=2),
            reverb=column["reverb"] < cfg.reverb_prob,
            rt60=uniform("rt60", cfg.reverb_rt60),
            drr_db=uniform("drr", cfg.reverb_drr_db),
            noise_seed=noise_seed,
            room_seed=room_seed,
        )

    def apply(self, audio: torch.Tensor, draws: Draws) -> torch.Tensor:
        """`audio` [B, T] changed as `draws` say; crops that no change touches come back bit for bit."""
        out = audio
        if bool(draws.reverb.any()):
            out = torch.where(draws.reverb[:, None], self.room(out, draws), out)
        spectral = draws.eq | draws.noise | draws.band
        if bool(spectral.any()):
            out = torch.where(spectral[:, None], self.spectrum(out, draws), out)
        if bool(draws.resample.any()):
            out = torch.where(draws.resample[:, None], self.round_trip(out), out)
        return out

    def room(self, audio: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Every crop convolved with its room: a unit direct path, then Gaussian noise whose amplitude falls
        60 dB in `rt60` seconds, scaled to the direct-to-reverberant energy ratio `drr_db`."""
        n, length = audio.shape[-1], self.room_samples
        generator = torch.Generator(device=audio.device).manual_seed(draws.room_seed)
        t = torch.arange(length, device=audio.device) / self.sample_rate
        tail = torch.randn(len(audio), length, generator=generator, device=audio.device)
        tail = tail * torch.exp(-3 * math.log(10) * t / draws.rt60[:, None])
        tail[:, 0] = 0.0
        energy = 10 ** (-draws.drr_db / 10)
        response = tail * (energy / tail.square().sum(-1)).sqrt()[:, None]
        response[:, 0] = 1.0
        size = 1 << (n + length - 2).bit_length()  # a power of two, at least n + length - 1: no wrap-around
        spectrum = torch.fft.rfft(audio, size) * torch.fft.rfft(response, size)
        return torch.fft.irfft(spectrum, size)[:, :n]

    def spectrum(self, audio: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Every crop through its equalisation, plus its noise, through its band limits (each where drawn)."""
        n = audio.shape[-1]
        freq = torch.fft.rfftfreq(n, 1 / self.sample_rate, device=audio.device)[None]  # [1, F]
        spectrum = torch.fft.rfft(audio)
        if bool(draws.eq.any()):
            octaves = (freq.clamp_min(TILT_FROM_HZ) / TILT_FROM_HZ).log2()
            tilt = 2 * octaves / math.log2(self.sample_rate / 2 / TILT_FROM_HZ) - 1
            shelf = torch.tanh((freq.clamp_min(1.0) / draws.shelf_hz[:, None]).log2() / SHELF_OCTAVES)
            gain_db = draws.tilt_db[:, None] * tilt + draws.shelf_db[:, None] * shelf
            spectrum = spectrum * torch.where(draws.eq[:, None], 10 ** (gain_db / 20), 1.0)
        if bool(draws.noise.any()):
            generator = torch.Generator(device=audio.device).manual_seed(draws.noise_seed)
            white = torch.view_as_complex(torch.randn(*spectrum.shape, 2, generator=generator, device=audio.device))
            shape = freq.clamp_min(NOISE_FLOOR_HZ) ** (-draws.colour[:, None] / 2)
            shape[:, 0] = shape[:, -1] = 0.0  # no DC; the last bin may be Nyquist's, which must be real
            noise = white * shape
            ratio = 10 ** (draws.snr_db / 10)
            scale = (_mean_square(spectrum, n) / (_mean_square(noise, n) * ratio)).sqrt() * draws.noise
            spectrum = spectrum + noise * scale[:, None]
        if bool(draws.band.any()):
            lowpass = _rise((draws.cutoff_hz[:, None] - freq) / LOW_PASS_WIDTH_HZ)
            highpass = torch.where(
                draws.highpass[:, None], _rise((freq - self.cfg.highpass_hz) / HIGH_PASS_WIDTH_HZ), 1.0
            )
            spectrum = spectrum * torch.where(draws.band[:, None], lowpass * highpass, 1.0)
        return torch.fft.irfft(spectrum, n)

    def round_trip(self, audio: torch.Tensor) -> torch.Tensor:
        """Every crop decimated to 8 kHz and interpolated back (both with one windowed-sinc low-pass at 4 kHz),
        so that the crop is the interpolation of its own samples on the 8 kHz grid."""
        factor = self.sample_rate // PHONE_RATE
        kernel = phone_filter(factor, audio.device)
        half = kernel.shape[-1] // 2
        decimated = F.conv1d(audio[:, None], kernel, padding=half)[:, 0, ::factor]
        return interpolate(decimated, factor, audio.shape[-1])


def phone_filter(factor: int, device: torch.device) -> torch.Tensor:
    """The round trip's low-pass [1, 1, K] at 1/`factor` of the rate: a Kaiser-windowed sinc whose taps at
    nonzero multiples of `factor` are exactly 0, so interpolation keeps the decimated samples as they are."""
    half = ZERO_CROSSINGS * factor
    k = torch.arange(-half, half + 1, device=device)
    window = torch.kaiser_window(2 * half + 1, periodic=False, beta=KAISER_BETA, device=device)
    taps = torch.where(k % factor == 0, (k == 0).float(), torch.sinc(k / factor)) * window / factor
    return taps[None, None]


def interpolate(samples: torch.Tensor, factor: int, length: int) -> torch.Tensor:
    """`samples` [B, T'] taken at 1/`factor` of the rate, back at the full rate: [B, length]."""
    stuffed = torch.zeros(len(samples), length, device=samples.device, dtype=samples.dtype)
    stuffed[:, ::factor] = samples[:, : (length + factor - 1) // factor]
    kernel = phone_filter(factor, samples.device)
    return factor * F.conv1d(stuffed[:, None], kernel, padding=kernel.shape[-1] // 2)[:, 0]


def _rise(x: torch.Tensor) -> torch.Tensor:
    """0 for x <= 0, 1 for x >= 1, a raised-cosine step between."""
    return torch.sin(0.5 * math.pi * x.clamp(0.0, 1.0)).square()


def _mean_square(spectrum: torch.Tensor, n: int) -> torch.Tensor:
    """Mean square [B] of the length-`n` signals whose real FFTs are `spectrum` [B, F] (Parseval)."""
    weight = torch.full((spectrum.shape[-1],), 2.0, device=spectrum.device)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    return (spectrum.abs().square() * weight).sum(-1) / n**2
