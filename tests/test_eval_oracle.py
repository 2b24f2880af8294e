"""eval.oracle: the mixes of the decoder's and the input's magnitudes and phases."""

import numpy as np
import soundfile as sf
import torch

from codec.model import SimVQCodec
from codec.features import causal_stft, hann_window
from eval import oracle
from tests.conftest import speechlike

TINY = dict(
    encoder_dim=32,
    encoder_layers=1,
    decoder_dim=32,
    decoder_layers=1,
    latent_dim=16,
    n_stages=2,
    codebook_size=64,
    code_dim=8,
    whiten_codes=True,
    principal_maps=False,
    phase="absolute",
    pitch_prior=False,
    rephase_iters=0,
    advance_features=False,
)


def tiny(**options) -> SimVQCodec:
    return SimVQCodec(**{**TINY, **options})


def test_a_decoder_that_outputs_the_input_stft_reproduces_the_input_in_every_mix_that_keeps_its_phase():
    model = tiny().eval()
    wav = torch.from_numpy(speechlike(0.4))[None, None]
    spec = causal_stft(wav[:, 0], hann_window(model.synthesis.n_fft), model.synthesis.hop)
    exact = torch.stack([spec.abs().clamp_min(1e-12).log(), spec.angle()], dim=2).reshape(1, -1, model.synthesis.in_dim)
    model._decode = lambda latents: (exact, None)  # a perfect (absolute-phase) decoder
    out = oracle.mixes(model, wav, 2, torch.Generator().manual_seed(0))
    propagated = {"model/own", "model/prior", "input/prior", "model/harm-head", "model/harm-yin", "model/harm-sent"}
    assert set(out) == set(oracle.MIXES) - propagated
    target = wav[0, 0, : wav.shape[-1] - model.synthesis.delay]
    for name in ("model/model", "model/input", "input/model"):
        assert torch.allclose(out[name], target, atol=1e-4), name
    assert not torch.allclose(out["input/random"], target, atol=1e-2)
    assert all(len(a) == len(target) and torch.isfinite(a).all() for a in out.values())


def test_cli_prints_every_mix(tmp_path, capsys):
    model_dir = tmp_path / "model"
    from codec.checkpoint import save_model

    save_model(tiny(phase="propagated", pitch_prior=True, rephase_iters=1), model_dir)
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", speechlike(1.0, seed=1).astype(np.float32), 16000)
    assert oracle.main([str(audio), "--model", str(model_dir), "--per-speaker", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 files, 2 stages" in printed
    assert all(name in printed for name in oracle.MIXES)
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[1:]}
    convergence = {name: float(row[row.index("convergence") + 1]) for name, row in rows.items()}
    assert convergence["model/input"] >= 0 and convergence["input/random"] > 0.1  # random phases smear harmonics
    assert oracle.main([str(tmp_path / "missing")]) == 2


def test_the_prior_mixes_put_voiced_frames_on_the_harmonics_of_the_input_pitch():
    model = tiny(phase="propagated", pitch_prior=True).eval()
    wav = torch.from_numpy(speechlike(0.6, seed=2))[None, None]
    out = oracle.mixes(model, wav, 2, torch.Generator().manual_seed(0))
    assert set(out) == set(oracle.MIXES) - {"model/own"}  # that one needs `rephase_iters`
    # The harmonic mixes keep the decoder's own phases where their track is unvoiced and change the rest.
    assert not torch.allclose(out["model/harm-yin"], out["model/model"], atol=1e-3)
    # On voiced speech-like input the prior changes the phases, so it changes what the input's magnitudes play.
    assert not torch.allclose(out["input/prior"], out["input/model"], atol=1e-3)
    assert torch.isfinite(out["model/prior"]).all()


def test_with_re_phasing_the_model_mix_is_what_the_codec_plays_and_the_own_mix_is_not():
    model = tiny(phase="propagated", rephase_iters=2).eval()
    wav = torch.from_numpy(speechlike(0.6, seed=3))[None, None]
    out = oracle.mixes(model, wav, 2, torch.Generator().manual_seed(0))
    played = model.decode(model.encode(wav, 2))[0, 0, : out["model/model"].shape[-1]]
    torch.testing.assert_close(out["model/model"], played, rtol=0, atol=1e-5)
    assert not torch.allclose(out["model/own"], played, atol=1e-3)
