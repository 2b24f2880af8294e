"""The pitch path: the YIN pitch track the head learns from, the harmonic phase prior, the pitch head."""

import math

import numpy as np
import pytest
import torch

from codec.model import SimVQCodec
from codec.pitch import PitchHead
from tests.conftest import tiny_codec
from tests.test_model import _stream_decode
from training.pitch import pitch_loss, yin_f0

SR, N_FFT, HOP = 16000, 320, 80


def harmonic_glide(start_hz: float, end_hz: float, seconds: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A 12-harmonic tone gliding linearly in f0, and its f0 at the centre of each synthesis sub-frame."""
    t = np.arange(int(SR * seconds)) / SR
    f0 = start_hz + (end_hz - start_hz) * t / seconds
    phase = 2 * math.pi * np.cumsum(f0) / SR
    wav = sum(np.sin(k * phase) / k for k in range(1, 13)).astype(np.float32) * 0.3
    centres = (np.arange(len(t) // HOP) + 1) * HOP - N_FFT // 2
    return wav, f0[centres]


@pytest.mark.parametrize("start, end", [(80.0, 140.0), (180.0, 320.0)])
def test_yin_follows_a_gliding_harmonic_tone(start, end):
    wav, truth = harmonic_glide(start, end)
    f0, voiced = yin_f0(torch.from_numpy(wav)[None], SR, N_FFT, HOP)
    inner = slice(4, -4)  # the first and last estimates reach past the signal's ends
    assert voiced[0, inner].all()
    assert np.abs(f0[0, inner].numpy() / truth[inner] - 1).max() < 0.01


def test_causal_yin_uses_no_sample_after_each_sub_frame_and_still_follows_the_tone():
    wav, truth = harmonic_glide(120.0, 180.0)
    audio = torch.from_numpy(wav)[None]
    f0, voiced = yin_f0(audio, SR, N_FFT, HOP, causal=True)
    cut = 100 * HOP  # change everything after sub-frame 99's last sample
    changed = torch.cat([audio[:, :cut], torch.from_numpy(np.random.default_rng(1).normal(0, 0.3, SR - cut))[None]], 1)
    f0_changed, _ = yin_f0(changed.float(), SR, N_FFT, HOP, causal=True)
    assert torch.equal(f0[0, :100], f0_changed[0, :100]) and not torch.equal(f0[0, 100:], f0_changed[0, 100:])
    # it describes the pitch of its window, which ends where the sub-frame ends: behind the centred estimate
    inner = slice(8, -4)
    assert voiced[0, inner].all()
    assert np.abs(f0[0, inner].numpy() / truth[inner] - 1).max() < 0.05


def test_yin_calls_noise_and_silence_unvoiced():
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32))
    silence_then_tone = torch.cat([torch.zeros(SR // 2), torch.from_numpy(harmonic_glide(120, 120, 0.5)[0])])
    f0, voiced = yin_f0(torch.stack([noise, silence_then_tone]), SR, N_FFT, HOP)
    assert voiced[0].float().mean() < 0.1
    assert not voiced[1, :90].any() and voiced[1, 110:-4].all()
    assert (f0[~voiced] == 0).all()


def test_the_pitch_head_reads_f0_between_its_bins_and_its_loss_counts_only_voiced_frames():
    head = PitchHead(dim=8, frames_per_step=1, gate_bins=3)
    bins = head.bin_log_f0
    target = torch.tensor([[150.0, 0.0]])
    voiced = torch.tensor([[True, False]])
    # the log of a Gaussian at 150 Hz
    peaked = -0.5 * ((target.clamp_min(1.0).log()[..., None] - bins) / (bins[1] - bins[0])) ** 2
    assert head.log_f0(peaked[:, :1]).exp().item() == pytest.approx(150.0, rel=0.005)
    anywhere = torch.randn(1, 2, head.bins)  # the unvoiced frame's f0 logits do not count
    right = pitch_loss(
        torch.cat([peaked[:, :1], anywhere[:, 1:]], 1), torch.tensor([[20.0, -20.0]]), bins, target, voiced
    )
    wrong = pitch_loss(peaked.roll(20, dims=-1), torch.tensor([[-20.0, 20.0]]), bins, target, voiced)
    assert wrong["pitch/f0"] > right["pitch/f0"] + 5 and wrong["pitch/voicing"] > 10 > 1e-6 > right["pitch/voicing"]


def test_the_harmonic_prior_puts_each_voiced_bin_on_its_nearest_harmonic():
    synth = SimVQCodec(phase="propagated").synthesis
    f0 = torch.tensor([[110.0, 0.0]]) / SR  # a voiced and an unvoiced sub-frame
    deviation = synth.harmonic_deviation(f0)
    advance = deviation[0, 0] + 2 * math.pi * synth.hop * torch.arange(synth.bins) / synth.n_fft
    frequency = advance / (2 * math.pi * synth.hop) * SR  # Hz that each bin turns at
    harmonic = torch.round(frequency / 110.0)
    assert torch.allclose(frequency, harmonic * 110.0)
    centre = torch.arange(synth.bins) * SR / synth.n_fft
    above = centre >= 55.0  # below half of f0, bins take the first harmonic
    assert ((frequency - centre).abs()[above] <= 55.0 + 1e-6).all() and (harmonic[~above] == 1).all()
    assert (deviation[0, 1] == 0).all()


def head_bias(model: SimVQCodec) -> torch.Tensor:
    """The pitch head's output bias as `[frames_per_step, f0 bins + voicing + trust per synthesis bin]`."""
    return model.pitch_head.proj[-1].bias.view(model.pitch_head.frames_per_step, -1)


def test_a_trusted_prior_puts_voiced_deviations_on_the_harmonics_and_an_untrusted_one_leaves_them():
    model = tiny_codec(seed=5, phase="propagated", pitch_prior=True)
    head, syn = model.pitch_head, model.synthesis
    latents = torch.randn(1, 6, 16)
    with torch.no_grad():
        head_bias(model)[:, : head.bins] = -0.5 * (torch.arange(head.bins) - 40.0) ** 2  # f0 at bin 40
        head_bias(model)[:, head.bins] = 20.0  # voiced
        head_bias(model)[:, head.bins + 1 :] = 20.0  # full trust
        trusted = syn.split(model.decode_spectrum(latents))[1]
        head_bias(model)[:, head.bins + 1 :] = -30.0  # no trust
        untrusted = syn.split(model.decode_spectrum(latents))[1]
        model.pitch_head = None
        plain = syn.split(model.decode_spectrum(latents))[1]
    f0 = head.bin_log_f0[40].exp()
    expected = syn.harmonic_deviation(torch.full((1, 24), float(f0) / SR)).float()
    torch.testing.assert_close(trusted, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(untrusted, plain, atol=1e-6, rtol=0)


def test_a_new_pitch_head_leaves_a_trained_decoder_unchanged_until_it_calls_frames_voiced():
    plain = tiny_codec(seed=1, phase="propagated")
    grown = tiny_codec(seed=2, phase="propagated", pitch_prior=True)
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert {k.split(".")[0] for k in missing} == {"pitch_head"} and not unexpected
    codes = torch.randint(0, 64, (2, 4, 7))
    torch.testing.assert_close(grown.decode(codes), plain.decode(codes), rtol=0, atol=0)
    with torch.no_grad():
        head_bias(grown)[:, grown.pitch_head.bins] = 5.0  # every sub-frame voiced
    assert not torch.allclose(grown.decode(codes), plain.decode(codes))


def test_teacher_forced_f0_drives_the_prior_and_nan_falls_back_to_the_head():
    model = tiny_codec(seed=3, phase="propagated", pitch_prior=True)
    wav = torch.from_numpy(harmonic_glide(150, 150, 0.2)[0])[None, None]
    n = wav.shape[-1] // HOP
    head = model(wav).audio
    assert torch.equal(model(wav, f0=torch.full((1, n), float("nan"))).audio, head)
    assert not torch.allclose(model(wav, f0=torch.full((1, n), 150.0)).audio, head)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [3, 2, 4]])
def test_a_voiced_pitch_prior_streams_like_offline(chunks):
    model = tiny_codec(seed=4, phase="propagated", pitch_prior=True)
    with torch.no_grad():
        model.pitch_head.proj[-1].weight.normal_(0, 0.5)  # a head whose f0 and voicing vary frame to frame
        head_bias(model)[:, model.pitch_head.bins] = 0.5
    codes = torch.randint(0, 64, (2, 4, 9))
    # Looser than the plain decoder's 1e-5: a last-bit difference in f0 between the two passes enters the
    # running phase sums multiplied by the harmonic's number (up to ~100 here).
    torch.testing.assert_close(_stream_decode(model, codes, chunks), model.decode(codes), rtol=0, atol=2e-4)


def test_pitch_prior_needs_propagated_phase():
    with pytest.raises(ValueError, match="propagated"):
        SimVQCodec(phase="absolute", pitch_prior=True)
