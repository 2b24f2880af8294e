"""Shared fixtures: tiny models that make the suite fast on two CPU cores, and the shipped recordings."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from codec.features import causal_stft, hann_window
from codec.model import SimVQCodec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The shipped model's phase features (pitch head, re-phasing, phase advances) are off: the tests that need them
# ask for them, the rest stay fast.
TINY = dict(
    encoder_dim=32,
    encoder_layers=2,
    decoder_dim=32,
    decoder_layers=2,
    latent_dim=16,
    n_stages=4,
    codebook_size=64,
    code_dim=8,
    whiten_codes=True,
    principal_maps=False,
    phase="absolute",
    straight_through="stage",
    quantize_fraction=1.0,
    pitch_prior=False,
    rephase_iters=0,
    advance_features=False,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_codec(seed: int = 0, **overrides) -> SimVQCodec:
    torch.manual_seed(seed)
    return SimVQCodec(**{**TINY, **overrides}).eval()


@pytest.fixture
def tiny_model() -> SimVQCodec:
    return tiny_codec()


def speechlike(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated harmonic signal with noise: cheap stand-in for speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3 * t)) ** 2
    return (0.1 * envelope * voiced + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def voice_with_disagreeing_advances(synth, seconds: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """A voice's own STFT magnitudes with its phase advances each up to 1 rad off, as the synthesis' input
    `[1, steps, in_dim]`, and those magnitudes `[N, bins]`."""
    voice = torch.from_numpy(speechlike(seconds)).float()
    spec = causal_stft(voice, hann_window(synth.n_fft), synth.hop)  # [N, bins]
    n = spec.shape[0] - spec.shape[0] % synth.frames_per_step
    advance = torch.diff(spec.angle()[:n], dim=0, prepend=torch.zeros(1, synth.bins))
    deviation = advance - synth.phase_advances(torch.zeros(n, synth.bins)) + (torch.rand(n, synth.bins) - 0.5) * 2
    log_mag = spec.abs()[:n].clamp_min(1e-6).log()
    return torch.stack([log_mag, deviation], dim=1).reshape(1, n // synth.frames_per_step, -1), spec.abs()[:n]


def example_speech(name: str = "speech.wav") -> np.ndarray:
    """A real recording the repository ships (examples/, 16 kHz mono float32 [T]; examples/README.md).

    Tests whose expectations depend on the signal use these, never speech found on the machine, so a
    fresh clone scores exactly what the expectations were set on.
    """
    wav, rate = sf.read(EXAMPLES / name, dtype="float32")
    assert rate == 16000 and wav.ndim == 1, f"examples/{name} must be 16 kHz mono"
    return wav


def write_speaker_corpus(root, short: tuple[int, int] | None = None):
    """Three speakers x three files of speech-like audio at 16, 22.05 and 8 kHz under `root` (1.2 s each; the
    file `short` = (speaker, index), if given, lasts 0.15 s, shorter than a training crop). Returns `root`."""
    import soundfile as sf

    for spk, rate in enumerate((16000, 22050, 8000)):
        (root / f"spk{spk}").mkdir()
        for i in range(3):
            seconds = 0.15 if (spk, i) == short else 1.2
            sf.write(root / f"spk{spk}/u{i}.wav", speechlike(seconds, rate, seed=10 * spk + i), rate)
    return root


def write_ood_manifest(root):
    """An out-of-domain dev set as `training.corpus` writes one (`dev-ood.csv`, paths relative to it): two
    voices x two files of noisier speech-like audio at 8 kHz, unlike `write_speaker_corpus`'s. Returns the
    manifest's path."""
    rows = ["path,speaker,duration,split"]
    for spk in range(2):
        for i in range(2):
            rng = np.random.default_rng(100 + 10 * spk + i)
            audio = speechlike(1.0, 8000, seed=100 + 10 * spk + i) + 0.03 * rng.standard_normal(8000)
            sf.write(root / f"ood{spk}_{i}.wav", audio.astype(np.float32), 8000)
            rows.append(f"ood{spk}_{i}.wav,ood{spk},1.0,dev-ood")
    path = root / "dev-ood.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path
