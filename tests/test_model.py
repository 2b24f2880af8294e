"""The codec model: shapes, streaming = offline, causality, quantizer behaviour."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codec.model import SimVQCodec
from codec.features import causal_stft, hann_window
from codec.synthesis import PHASE_GRADIENT_FLOOR, unit_phase
from codec.quantizer import ResidualQuantizer, RunningWhitener, SimVQCodebook
from tests.conftest import tiny_codec, voice_with_disagreeing_advances

HOP = 320


def _stream_encode(model, wav, chunks, n_stages=None):
    out, start = [], 0
    with model.streaming(wav.shape[0]):
        for size in chunks:
            out.append(model.encode(wav[..., start : start + size], n_stages))
            start += size
        out.append(model.encode(wav[..., start:], n_stages))
        out.append(model.flush_encoder(n_stages))
    return torch.cat(out, dim=-1)


def _stream_decode(model, codes, chunks):
    out, start = [], 0
    with model.streaming(codes.shape[0]):
        for size in chunks:
            out.append(model.decode(codes[..., start : start + size]))
            start += size
        out.append(model.decode(codes[..., start:]))
        out.append(model.flush_decoder())
    return torch.cat(out, dim=-1)


def test_shapes_and_properties(tiny_model):
    wav = torch.randn(2, 1, 5 * HOP + 17)
    codes = tiny_model.encode(wav)
    assert codes.shape == (2, 4, 6) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert tiny_model.decode(codes).shape == (2, 1, 6 * HOP)
    assert tiny_model.encode(wav, n_stages=2).shape == (2, 2, 6)
    assert tiny_model.frame_rate == 50 and tiny_model.bits_per_code == 6 and tiny_model.num_codebooks == 4
    assert tiny_model.bitrate(2) == 2 * 6 * 50
    mixed = tiny_codec(codebook_size=[128, 64, 64, 64])
    assert (mixed.stage_bits, mixed.bits_per_code, mixed.bitrate(2)) == ((7, 6, 6, 6), None, (7 + 6) * 50)


def test_fewer_stages_are_a_prefix(tiny_model):
    wav = torch.randn(1, 1, 8 * HOP)
    assert torch.equal(tiny_model.encode(wav, n_stages=2), tiny_model.encode(wav)[:, :2])


@pytest.mark.parametrize("advance_features", [False, True])
@settings(max_examples=15, deadline=None)
@given(chunks=st.lists(st.integers(1, 3 * HOP), min_size=1, max_size=12), extra=st.integers(0, HOP - 1))
def test_streaming_encode_equals_offline(advance_features, chunks, extra):
    # float64 so that no nearest-neighbour tie can flip between differently shaped matmuls.
    model = tiny_codec(seed=1, advance_features=advance_features).double()
    torch.manual_seed(2)
    wav = torch.randn(2, 1, 6 * HOP + extra, dtype=torch.float64) * 0.3
    assert torch.equal(_stream_encode(model, wav, chunks), model.encode(wav))


def test_advance_features_give_a_steady_tones_offset_from_its_bin_centre():
    """A sinusoid `offset` Hz above a bin's centre advances by 2 pi hop offset / rate more than the centre does
    from one short frame to the next: the angle of that bin's advance feature, in every frame it fills."""
    model = SimVQCodec()
    features, rate, offset = model.features, model.sample_rate, 12.0
    bins, n = features.n_fft // 2 + 1, features.frames_per_step
    freq = 10 * rate / features.n_fft + offset  # bin 10 (500 Hz) + 12 Hz
    t = torch.arange(8 * HOP, dtype=torch.float64) / rate
    feats = features(torch.sin(2 * math.pi * freq * t)[None, None].float())  # [1, 8, n * 5 * bins]
    assert feats.shape == (1, 8, features.out_dim) and features.out_dim == n * 5 * bins
    advances = feats[0, 2:, n * 3 * bins :].reshape(6 * n, 2, bins)[:, :, 10]  # frames past the onset
    angle = torch.atan2(advances[:, 1], advances[:, 0])
    expected = 2 * math.pi * features.hop * offset / rate
    assert torch.allclose(angle, torch.full_like(angle, expected), atol=1e-3)
    plain = SimVQCodec(advance_features=False).features
    assert torch.equal(
        plain(torch.sin(2 * math.pi * freq * t)[None, None].float()), feats[..., : n * 3 * bins]
    )  # the other features are the same as without advances


@pytest.mark.parametrize("advance_features", [False, True])
def test_long_inputs_get_their_features_in_pieces_that_equal_one_pass(advance_features, monkeypatch):
    import codec.features

    features = SimVQCodec(advance_features=advance_features).features
    steps = 2 * codec.features.FEATURE_CHUNK + 5  # two whole pieces and a short one
    wav = torch.randn(2, 1, steps * HOP) * 0.3
    pieces = features(wav)
    monkeypatch.setattr(codec.features, "FEATURE_CHUNK", steps)
    assert pieces.shape == (2, steps, features.out_dim)
    assert torch.equal(pieces, features(wav))


def test_streaming_encode_single_samples(tiny_model):
    wav = torch.randn(1, 1, 3 * HOP + 5) * 0.3
    assert torch.equal(_stream_encode(tiny_model, wav, [1] * wav.shape[-1]), tiny_model.encode(wav))


def test_streaming_encode_default_architecture_float32():
    model = SimVQCodec().eval()
    wav = torch.randn(1, 1, 16000 * 2 + 77) * 0.1
    assert torch.equal(_stream_encode(model, wav, [1, 319, 700, 5000, 13]), model.encode(wav))


@settings(max_examples=15, deadline=None)
@given(chunks=st.lists(st.integers(1, 5), min_size=1, max_size=8))
def test_streaming_decode_equals_offline(chunks):
    model = tiny_codec(seed=3)
    codes = torch.randint(0, 64, (2, 4, 20))
    offline = model.decode(codes)
    streamed = _stream_decode(model, codes, chunks)
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max() <= 1e-5 * offline.abs().max()


def test_causality_appending_audio_keeps_earlier_codes_and_samples(tiny_model):
    wav = torch.randn(1, 1, 10 * HOP) * 0.3
    longer = torch.cat([wav, torch.randn(1, 1, 4 * HOP)], dim=-1)
    assert torch.equal(tiny_model.encode(longer)[..., :10], tiny_model.encode(wav))
    codes = tiny_model.encode(longer)
    complete = 10 * HOP - tiny_model.decoder_delay  # the rest needs frames 10 and later
    torch.testing.assert_close(
        tiny_model.decode(codes[..., :10])[..., :complete], tiny_model.decode(codes)[..., :complete]
    )


def test_streamed_decoder_output_lags_by_the_delay_and_the_flush_returns_the_rest(tiny_model):
    codes = torch.randint(0, 64, (1, 4, 3))
    with tiny_model.streaming(1):
        first = tiny_model.decode(codes[..., :1])
        assert first.shape[-1] == HOP - tiny_model.decoder_delay
        assert tiny_model.decode(codes[..., 1:]).shape[-1] == 2 * HOP
        assert tiny_model.flush_decoder().shape[-1] == tiny_model.decoder_delay
        assert tiny_model.flush_decoder().shape[-1] == 0  # flushed: nothing pending
    with pytest.raises(RuntimeError, match="streaming"):
        tiny_model.flush_decoder()


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [3, 2, 4], [7]])
def test_propagated_phase_streams_like_offline(chunks):
    model = tiny_codec(seed=4, phase="propagated")
    codes = torch.randint(0, 64, (2, 4, 9))
    torch.testing.assert_close(_stream_decode(model, codes, chunks), model.decode(codes), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [3, 2, 4], [7]])
def test_rephased_synthesis_streams_like_offline(chunks):
    model = tiny_codec(seed=5, phase="propagated", rephase_iters=2)
    codes = torch.randint(0, 64, (2, 4, 9))
    torch.testing.assert_close(_stream_decode(model, codes, chunks), model.decode(codes), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(phase="absolute", pitch_prior=False), "rephase_iters needs phase='propagated'"),
        (dict(carry_share=1.5), r"carry_share must lie in \[0, 1\]"),
    ],
)
def test_rephasing_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        SimVQCodec(**options)


@pytest.mark.parametrize("chunks", [[1] * 9, [3, 2, 4], [7, 2]])
@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "pytorch"])
def test_played_rephasing_streams_like_offline_bit_for_bit(chunks, grad):
    """From the same decoder output, streaming runs the same steps in the same order as offline, in either
    form of the steps (`codec.rephasing`: inference on the CPU; PyTorch's: training, other devices)."""
    synth = SimVQCodec().synthesis
    x = (torch.randn(2, 9, synth.in_dim) * 0.5).requires_grad_(grad)
    out, start = [], 0
    with synth.streaming(2):
        for size in chunks:
            out.append(synth(x[:, start : start + size]))
            start += size
        out.append(synth.flush())
    assert torch.equal(torch.cat(out, dim=-1), synth(x))


def test_rephasing_makes_disagreeing_frames_agree_with_the_magnitudes_they_were_given():
    """A voice's own STFT magnitudes played with its phase advances each up to 1 rad off: overlapping frames
    disagree, and the played audio's STFT misses the magnitudes it was given. Re-phasing each step brings
    the two together, more with more iterations, and leaves earlier steps as they were (causal)."""
    torch.manual_seed(0)
    synth = SimVQCodec().synthesis
    x, magnitudes = voice_with_disagreeing_advances(synth)
    given = magnitudes[3:-3]  # frames 0-2 reach before the start, the last 3 past the end

    def mismatch(audio):
        heard = causal_stft(audio[0, 0], hann_window(synth.n_fft), synth.hop)[3:-3].abs()
        return float((heard - given).norm() / given.norm())

    errors = []
    for iters in (0, 1, 4):
        synth.rephase_iters = iters
        audio = synth(x)
        errors.append(mismatch(audio))
        if iters:
            complete = 10 * synth.frames_per_step * synth.hop - synth.delay  # samples no later step touches
            torch.testing.assert_close(audio[..., :complete], synth(x[:, :10])[..., :complete])
    assert errors[1] < 0.7 * errors[0] and errors[2] < errors[1]


def test_played_rephasing_does_not_amplify_rounding_differences():
    """A step re-phased from what was played carries part of that phase on (`carry_share`): a change in the
    last bits of the decoder's output stays a small change in the audio instead of growing step by step."""
    torch.manual_seed(1)
    synth = SimVQCodec().synthesis
    x, _ = voice_with_disagreeing_advances(synth, seconds=2.0)
    audio = synth(x)
    moved = synth(x + 1e-6 * torch.randn_like(x)) - audio
    snr_db = 10 * torch.log10(audio.square().sum() / moved.square().sum())
    assert snr_db > 70, snr_db


def test_rephased_synthesis_passes_gradients_to_magnitudes_and_advances():
    synth = SimVQCodec().synthesis
    x = (torch.randn(1, 3, synth.in_dim) * 0.5).requires_grad_()
    synth(x).square().sum().backward()
    log_mag_grad, deviation_grad = synth.split(x.grad)
    assert torch.isfinite(x.grad).all()
    assert log_mag_grad.abs().sum() > 0 and deviation_grad.abs().sum() > 0


def test_unit_phase_is_sgn_with_a_bounded_gradient():
    z = torch.complex(torch.tensor([3.0, 0.0, 1e-20, -2e-5, 0.5]), torch.tensor([4.0, 0.0, 0.0, 1e-5, -0.5]))
    exact = torch.sgn(z + 1e-30)
    assert torch.equal(unit_phase(z), exact) and unit_phase(z)[1] == 1  # a silent bin takes phase 0
    leaf = z.clone().requires_grad_()
    value = unit_phase(leaf)
    assert torch.equal(value.detach(), exact)
    value.real.sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().max() <= 1 / PHASE_GRADIENT_FLOOR
    # Above the floor the gradient is torch.sgn's own.
    big = z[[0, 4]].clone().requires_grad_()
    torch.sgn(big).real.sum().backward()
    loud = z[[0, 4]].clone().requires_grad_()
    unit_phase(loud).real.sum().backward()
    torch.testing.assert_close(loud.grad, big.grad)


def test_propagated_phase_with_zero_deviation_is_a_steady_tone():
    """Zero advance deviations in one bin give that bin's centre frequency as one continuous sinusoid."""
    synth = SimVQCodec(rephase_iters=0).synthesis
    bins, k, steps = synth.bins, 21, 10  # k not a multiple of 4: its centre advance is not a whole turn per hop
    x = torch.zeros(1, steps * synth.frames_per_step, 2, bins)
    x[:, :, 0] = -30.0  # log magnitude: silence ...
    x[:, :, 0, k] = 0.0  # ... but bin k
    out = synth(x.reshape(1, steps, -1))[0, 0, : -synth.delay].double()
    n = torch.arange(out.shape[-1], dtype=torch.float64)
    w = 2 * math.pi * k / synth.n_fft
    basis = torch.stack([torch.cos(w * n), torch.sin(w * n)], dim=1)
    fit = basis @ torch.linalg.lstsq(basis[synth.n_fft :], out[synth.n_fft :, None]).solution
    residual = (out[synth.n_fft :] - fit[synth.n_fft :, 0]).norm() / out[synth.n_fft :].norm()
    assert residual < 1e-3  # after the first window, where the sum builds up


@pytest.mark.parametrize("phase", ["absolute", "propagated"])
def test_a_padded_batch_decodes_like_lone_clips(phase):
    model = tiny_codec(seed=5, phase=phase)
    short, long = torch.randint(0, 64, (1, 4, 3)), torch.randint(0, 64, (1, 4, 7))
    batch = torch.cat([torch.cat([short, torch.zeros(1, 4, 4, dtype=torch.long)], dim=-1), long])
    audio = model.decode(batch, torch.tensor([3, 7]))
    torch.testing.assert_close(audio[:1, :, : 3 * HOP], model.decode(short), rtol=0, atol=1e-6)
    torch.testing.assert_close(audio[1:], model.decode(long), rtol=0, atol=1e-6)
    unmasked = model.decode(batch)[:1, :, : 3 * HOP]  # without num_frames the padding reaches the tail
    assert not torch.allclose(unmasked, model.decode(short), atol=1e-6)


def test_synthesis_frames_line_up_with_the_analysis_frames():
    """Feeding the encoder's own STFT to the decoder's inverse STFT gives the signal back, sample for sample:
    each synthesis frame covers the samples its analysis frame saw, so nothing is predicted ahead."""
    model = SimVQCodec(phase="absolute", pitch_prior=False, rephase_iters=0, advance_features=False)
    feats, synth = model.features, model.synthesis
    torch.manual_seed(0)
    wav = torch.randn(1, 1, 8 * model.hop_length, dtype=torch.float64)
    f = feats.double()(wav).reshape(1, -1, 3, feats.n_fft // 2 + 1)  # [B, sub-frames, (log|X|, re, im), bins]
    spectra = torch.stack([f[:, :, 0], torch.atan2(f[:, :, 2], f[:, :, 1])], dim=2)  # log magnitude, phase
    out = synth.double()(spectra.reshape(1, 8, -1))
    complete = wav.shape[-1] - model.decoder_delay
    torch.testing.assert_close(out[..., :complete], wav[..., :complete], rtol=0, atol=1e-4)


def test_changing_future_audio_does_not_change_past_latents(tiny_model):
    wav = torch.randn(1, 1, 10 * HOP)
    changed = wav.clone()
    changed[..., 6 * HOP :] = torch.randn(1, 1, 4 * HOP)
    a, b = tiny_model.encode_latents(wav), tiny_model.encode_latents(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_training_forward_returns_losses_and_counts():
    model = tiny_codec(quantizer_dropout=0.0).train()
    out = model(torch.randn(3, 1, 4 * HOP))
    assert out.audio.shape == (3, 1, 4 * HOP)
    counts = torch.stack(out.stage_counts)
    assert counts.shape == (4, 64) and int(counts.sum()) == 4 * 3 * 4
    assert out.commit_loss.item() > 0 and out.codebook_loss.item() > 0
    (out.audio.pow(2).mean() + out.commit_loss + out.codebook_loss).backward()
    proj = model.quantizer.stages[0].proj
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert model.encoder_in[0].weight.grad.abs().sum() > 0  # straight-through reaches the encoder


def test_simvq_codebook_is_linear_map_of_frozen_gaussian():
    book = SimVQCodebook(dim=8, codebook_size=32, init_from_data=False)
    assert not book.frozen_codebook.requires_grad
    assert book.frozen_codebook.std().item() == pytest.approx(8**-0.5, rel=0.3)
    with torch.no_grad():
        book.proj.weight.mul_(2.0)
        torch.testing.assert_close(book.codebook(), 2.0 * book.frozen_codebook)
    # The cached W(C) follows in-place weight changes (optimiser steps, EMA updates).
    with torch.no_grad():
        book.proj.bias.fill_(1.0)
        torch.testing.assert_close(book.codebook(), 2.0 * book.frozen_codebook + 1.0)
    # ... and changes in its submodules: the projections and the whitener's statistics.
    book = SimVQCodebook(dim=8, codebook_size=32, code_dim=4, whiten=True, init_from_data=False)
    with torch.no_grad():
        before = book.output_codebook().clone()
        book.out_proj.weight.mul_(3.0)
        torch.testing.assert_close(book.output_codebook() - book.out_proj.bias, 3.0 * (before - book.out_proj.bias))
        book.whitener.mean.add_(1.0)
        assert not torch.allclose(book.output_codebook() - book.out_proj.bias, 3.0 * (before - book.out_proj.bias))


def test_nearest_is_true_nearest_neighbour():
    book = SimVQCodebook(dim=4, codebook_size=16, init_from_data=False)
    z = torch.randn(50, 4)
    with torch.no_grad():
        codes = book.codebook()
        expected = torch.cdist(z, codes).argmin(1)
        assert torch.equal(book.nearest(z, codes), expected)


@pytest.mark.parametrize("extra", [0, 1, 3, 5])
def test_a_search_in_blocks_gives_every_row_the_code_of_one_search_at_once(extra):
    from codec.quantizer import SEARCH_BLOCK

    torch.manual_seed(3)
    book = SimVQCodebook(dim=8, codebook_size=8192, code_dim=8, init_from_data=False)
    rows = SEARCH_BLOCK // 8192
    z = torch.randn(3 * rows + extra, 8)
    with torch.no_grad():
        codes = book.codebook()
        whole = torch.addmm((codes * codes).sum(1)[None], z, codes.t(), alpha=-2.0).argmin(1)
        assert torch.equal(book.nearest(z, codes), whole)  # in blocks of `rows`, never fewer than MIN_ROWS


@pytest.mark.parametrize("width", [16, 64, 1024, 16384])
def test_first_argmin_finds_the_first_of_equal_minima_like_argmin(width):
    from codec.quantizer import first_argmin

    torch.manual_seed(4)
    distances = torch.randint(0, 50, (300, width)).float()  # many ties, also between groups
    distances[0] = 0.0  # a row that is all one value: its first column
    distances[1, -1] = -1.0  # the minimum in the last column of the last group
    assert torch.equal(first_argmin(distances), distances.argmin(1))


def test_inference_search_with_cached_norms_is_the_training_search_also_after_a_weight_change():
    torch.manual_seed(2)
    book = SimVQCodebook(dim=8, codebook_size=64, code_dim=4, whiten=True, init_from_data=False)
    x = torch.randn(40, 8)
    for _ in range(2):
        expected = book.nearest(book.lookup_input(x), book.codebook())  # gradients on: nothing cached
        with torch.no_grad():
            assert torch.equal(book.encode(x), expected)
            book.proj.weight.mul_(-1.5)  # moves every code: the cached norms must follow


def test_init_from_data_matches_input_scale_and_uses_many_codes():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(dim=16, n_stages=2, codebook_size=256, quantizer_dropout=0.0).train()
    z = torch.randn(4, 500, 16) * 7.0 + 3.0  # far from the unit-scale frozen codebook
    result = quantizer(z)
    used = (result.stage_counts[0] > 0).sum().item()
    assert used > 128, f"only {used} of 256 codes used after data-dependent init"
    books = quantizer.stages[0].codebook().detach()
    assert books.mean().item() == pytest.approx(3.0, abs=0.5)


def test_plain_vq_option_has_same_interface():
    model = tiny_codec(quantizer="vq").train()
    out = model(torch.randn(2, 1, 4 * HOP))
    assert out.codes.shape[1] == 4
    assert not hasattr(model.quantizer.stages[0], "proj")
    assert model.quantizer.stages[0].codes.requires_grad


def test_quantizer_dropout_varies_active_stages():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(dim=8, n_stages=6, codebook_size=16, quantizer_dropout=1.0).train()
    quantizer(torch.randn(64, 5, 8))  # first batch initialises every stage with all stages active
    counts = torch.stack(quantizer(torch.randn(64, 5, 8)).stage_counts).sum(1)
    assert counts[0] == 64 * 5 and counts[-1] < counts[0]
    assert np.all(np.diff(counts.numpy()) <= 0)


def test_dropout_weights_choose_the_stage_counts_trained():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(
        dim=8, n_stages=4, codebook_size=16, quantizer_dropout=1.0, dropout_weights=[0, 1, 0, 0]
    ).train()
    quantizer(torch.randn(64, 5, 8))  # initialises every stage
    counts = torch.stack(quantizer(torch.randn(64, 5, 8)).stage_counts).sum(1).tolist()
    assert counts == [64 * 5, 64 * 5, 0, 0]  # every example decoded from exactly two stages
    for bad in ([1, 1, 1], [0, 0, 0, 0], [1, -1, 1, 1]):
        with pytest.raises(ValueError, match="dropout_weights"):
            quantizer.set_training(1.0, "stage", 1.0, bad)


def test_quantize_fraction_passes_the_latent_through_for_the_other_examples():
    torch.manual_seed(0)
    z = torch.randn(200, 3, 8)
    twin = ResidualQuantizer(dim=8, n_stages=2, codebook_size=16, quantizer_dropout=0.0, quantize_fraction=0.0).train()
    result = twin(z)
    assert torch.equal(result.quantized, z)  # the twin's decoder sees the latent itself
    assert sum(int(c.sum()) for c in result.stage_counts) == 2 * 200 * 3  # its stages still search every frame
    half = ResidualQuantizer(dim=8, n_stages=2, codebook_size=16, quantizer_dropout=0.0, quantize_fraction=0.5).train()
    half(z)
    passed = (half(z).quantized == z).all(-1).all(-1)
    assert 50 < int(passed.sum()) < 150  # whole examples, about half of them
    assert not torch.equal(half.eval()(z).quantized, z)  # inference always quantizes
    with pytest.raises(ValueError, match="quantize_fraction"):
        ResidualQuantizer(quantize_fraction=1.5)


def test_rejects_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="mono"):
        tiny_model.encode(torch.randn(1, 2, HOP))
    with pytest.raises(ValueError, match="stages must be between 1 and"):
        tiny_model.encode(torch.randn(1, 1, HOP), n_stages=5)
    with pytest.raises(ValueError, match="codes must lie"):
        tiny_model.decode(torch.full((1, 2, 3), 64))
    with pytest.raises(ValueError, match="power of two"):
        SimVQCodec(codebook_size=1000)


def test_running_whitener_whitens_and_colours_back():
    torch.manual_seed(0)
    mixing = torch.tensor([[10.0, 0.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    z = torch.randn(4000, 3) @ mixing.t() + torch.tensor([5.0, -2.0, 1.0])
    whitener = RunningWhitener(3, eps=1e-4)
    whitener.update(z, torch.ones(len(z)))
    whiten, colour = whitener.matrices()
    white = (z - whitener.mean) @ whiten
    torch.testing.assert_close(torch.cov(white.t()), torch.eye(3), atol=0.02, rtol=0)
    torch.testing.assert_close(white @ colour + whitener.mean, z, atol=1e-3, rtol=1e-4)
    # Rows with weight 0 (inactive stages under quantizer dropout) do not count.
    polluted = RunningWhitener(3, eps=1e-4)
    polluted.update(torch.cat([z, torch.full((4000, 3), 1e3)]), torch.cat([torch.ones(4000), torch.zeros(4000)]))
    torch.testing.assert_close(polluted.mean, whitener.mean)
    # A non-finite batch (a step the trainer will skip) leaves the statistics alone.
    polluted.update(torch.full((10, 3), float("nan")), torch.ones(10))
    torch.testing.assert_close(polluted.mean, whitener.mean)


def test_whitening_keeps_codes_in_use_on_anisotropic_input():
    """The collapse of the default model's first runs, in miniature: one direction dominates the input."""
    torch.manual_seed(0)
    z = torch.randn(2000, 16) * torch.logspace(1, -2, 16)  # variances spanning six orders of magnitude
    used = {}
    for whiten in (False, True):
        book = SimVQCodebook(16, 256, code_dim=None, whiten=whiten).train()
        *_, idx = book(z)
        used[whiten] = int(idx.unique().numel())
    assert used[True] > 150 and used[False] < 0.5 * used[True], used


def test_codebook_parameters_get_their_own_learning_rate():
    from training.train import _param_groups

    model = tiny_codec()
    groups = _param_groups(model, 10.0)
    books = {id(p) for p in groups[1]["params"]}
    assert groups[1]["lr_scale"] == 10.0 and groups[0]["lr_scale"] == 1.0
    assert books == {id(p) for s in model.quantizer.stages for p in s.proj.parameters()}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def _train_behind_a_decoder(residual_weight: float, straight_through: str = "stage", steps: int = 300) -> list[float]:
    """Train a 4-stage quantizer with projections, as the codec does, behind a learned linear "decoder" whose
    target is not the latent itself; return the mean squared residual after 0, 1, ... 4 stages."""
    torch.manual_seed(0)
    z = torch.randn(1024, 16) @ torch.randn(16, 16)
    target = z @ torch.randn(16, 16)
    rq = ResidualQuantizer(
        16, 4, 64, code_dim=4, whiten=True, quantizer_dropout=0.0, straight_through=straight_through
    ).train()
    decoder = torch.nn.Linear(16, 16)
    optimizer = torch.optim.Adam([*rq.parameters(), *decoder.parameters()], lr=1e-2)
    for _ in range(steps):
        out = rq(z[None])
        loss = (decoder(out.quantized[0]) - target).pow(2).mean() / target.pow(2).mean()
        loss = loss + residual_weight * out.residual_loss + 0.25 * out.commit_loss + out.codebook_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rq.eval()
    energies, residual = [z.pow(2).mean().item()], z
    with torch.no_grad():
        for stage in rq.stages:
            residual = residual - stage.lookup(stage.encode(residual))
            energies.append(residual.pow(2).mean().item())
    return energies


def test_residual_loss_makes_every_stage_shrink_the_residual():
    """The shipped model's stage 1 once contributed 14x the latent's variance, so later stages mostly restated
    its code. In miniature: without `residual_loss` the residual grows stage after stage; with it, each stage
    leaves less than it was given. The loss reaches the maps back, not the encoder."""
    x = (torch.randn(64, 16) * 3).requires_grad_(True)
    ResidualQuantizer(16, 2, 64, code_dim=4, whiten=True).train()(x[None]).residual_loss.backward()
    assert x.grad is None or not x.grad.any()
    without = _train_behind_a_decoder(0.0)
    assert without[-1] > without[0], without
    for straight_through in ("stage", "latent"):
        energies = _train_behind_a_decoder(1.0, straight_through)
        assert all(after < before for before, after in zip(energies, energies[1:])), (straight_through, energies)
        assert energies[-1] < 0.5 * energies[0], (straight_through, energies)


def test_latent_straight_through_sends_the_decoder_gradient_to_the_latent_only():
    torch.manual_seed(0)
    rq = ResidualQuantizer(16, 3, 64, code_dim=4, whiten=True, quantizer_dropout=0.0, straight_through="latent").train()
    stage_mode = ResidualQuantizer(16, 3, 64, code_dim=4, whiten=True, quantizer_dropout=0.0)
    stage_mode.load_state_dict(rq.state_dict())
    x = (torch.randn(1, 64, 16) * 3).requires_grad_(True)
    out = rq(x)
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # the identity, whatever the codes
    assert all(p.grad is None for p in rq.parameters())  # the maps learn from residual_loss alone
    assert torch.allclose(stage_mode.train()(x).quantized, out.quantized, atol=1e-5)  # same forward values
    with pytest.raises(ValueError, match="straight_through"):
        ResidualQuantizer(16, 3, 64, straight_through="nowhere")


def test_calibrate_whiteners_fits_the_statistics_to_the_weights_in_hand():
    """The trainer's EMA averages `in_proj` but copies the whitening statistics of the trained weights; a
    search with statistics of another `in_proj` is mis-whitened until `calibrate_whiteners` refits them."""
    torch.manual_seed(0)
    z = torch.randn(4000, 16) @ torch.randn(16, 16)
    rq = ResidualQuantizer(16, 3, 256, code_dim=4, whiten=True, quantizer_dropout=0.0).train()
    rq(z[None])  # the running statistics of these weights
    with torch.no_grad():
        for stage in rq.stages:
            stage.in_proj.weight.mul_(5.0).add_(torch.randn_like(stage.in_proj.weight))  # "averaged" weights
    rq.eval()

    def first_stage_input_cov():
        x = rq.stages[0].lookup_input(z)
        return torch.cov(x.t())

    def used():
        return [int(c.unique().numel()) for c in rq.encode(z[None])[0]]

    stale, stale_used = first_stage_input_cov(), used()
    assert not torch.allclose(stale, torch.eye(4), atol=0.5)
    rq.calibrate_whiteners(z)
    assert torch.allclose(first_stage_input_cov(), torch.eye(4), atol=0.05)  # white again (up to the ridge)
    assert all(after > before for before, after in zip(stale_used, used())), (stale_used, used())


def test_stages_of_different_sizes_pack_their_own_bits():
    torch.manual_seed(0)
    model = tiny_codec(codebook_size=[256, 64, 64, 16], quantizer_dropout=0.0)
    assert model.codebook_sizes == (256, 64, 64, 16) and model.stage_bits == (8, 6, 6, 4)
    assert model.bitrate(2) == 14 * model.frame_rate and model.bitrate() == 24 * model.frame_rate
    with pytest.raises(ValueError, match="differ in size"):
        _ = model.codebook_size
    out = model.train()(torch.randn(2, 1, 4 * HOP))
    assert [c.numel() for c in out.stage_counts] == [256, 64, 64, 16]
    codes = model.eval().encode(torch.randn(1, 1, 6 * HOP))
    assert int(codes[0, 0].max()) < 256 and int(codes[0, 3].max()) < 16
    model.decode(codes)
    too_big = codes.clone()
    too_big[0, 3, 0] = 16  # in range for stage 1, not for stage 4
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(too_big)
    with pytest.raises(ValueError, match="codebook_size lists 3 values for 4 stages"):
        tiny_codec(codebook_size=[256, 64, 64])


def test_stages_search_each_in_its_own_lookup_space():
    torch.manual_seed(0)
    model = tiny_codec(
        codebook_size=[256, 64, 64, 16], code_dim=[None, 4, 4, 4], whiten_codes=[False, True, True, True]
    )
    first, second = model.quantizer.stages[:2]
    assert isinstance(first.in_proj, torch.nn.Identity) and first.whitener is None  # the latent itself, as it is
    assert second.in_proj.out_features == 4 and second.whitener is not None
    assert first.codebook().shape[1] == model.config["latent_dim"] and second.codebook().shape[1] == 4
    codes = model.eval().encode(torch.randn(1, 1, 6 * HOP))
    assert codes.shape[1] == 4 and model.decode(codes).shape[-1] == 6 * HOP
    with pytest.raises(ValueError, match="code_dim lists 2 values for 4 stages"):
        tiny_codec(code_dim=[None, 4])


def test_codes_drawn_from_the_stage_inputs_fit_them_better_than_gaussian_codes():
    torch.manual_seed(0)
    # Inputs that fill their space unevenly: a few tight clusters, as a stage's whitened input does.
    centres = torch.randn(12, 16) * 3.0
    z = (centres[torch.randint(12, (4000,))] + 0.3 * torch.randn(4000, 16))[None]
    gaussian = ResidualQuantizer(
        dim=16, n_stages=2, codebook_size=[256, 64], code_dim=4, whiten=True, quantizer_dropout=0.0
    )
    gaussian.train()(z)  # whitening statistics and the usual rescaled Gaussian codes
    drawn = ResidualQuantizer(
        dim=16, n_stages=2, codebook_size=[256, 64], code_dim=4, whiten=True, quantizer_dropout=0.0
    )
    drawn.load_state_dict(gaussian.state_dict())  # the same maps into and out of the lookup space
    drawn.draw_codebooks(z, generator=torch.Generator().manual_seed(0))
    first = drawn.stages[0]
    assert bool(first.initialized) and torch.equal(first.proj.weight, torch.eye(4))
    inputs = first.lookup_input(z[0]).detach()
    assert (torch.cdist(first.frozen_codebook, inputs).min(1).values < 1e-2).all()  # every code is an input
    with torch.no_grad():  # the first stage's squared error where it searches, and the codes it uses
        error = {
            name: torch.cdist(q.stages[0].lookup_input(z[0]), q.stages[0].codebook()).min(1).values.pow(2).mean()
            for name, q in (("gaussian", gaussian.eval()), ("drawn", drawn.eval()))
        }
        used = drawn.encode(z, 1).unique().numel()
    assert error["drawn"] < 0.7 * error["gaussian"] and used > 0.8 * 256
    with pytest.raises(ValueError, match="needs at least as many frames"):
        drawn.draw_codebooks(z[:, :100])


def _four_directions_of_sixteen(frames: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents `[1, frames, 16]` whose variance lies in 4 orthonormal directions (returned `[16, 4]`), off centre."""
    basis = torch.linalg.qr(torch.randn(16, 4)).Q
    z = (torch.randn(frames, 4) * torch.tensor([4.0, 3.0, 2.0, 1.5])) @ basis.t() + 0.05 * torch.randn(frames, 16)
    return (z + 2.0)[None], basis


def test_principal_maps_search_where_the_residual_varies_and_are_not_trained():
    from training.train import _param_groups

    torch.manual_seed(0)
    z, basis = _four_directions_of_sixteen()
    options = dict(dim=16, n_stages=3, codebook_size=64, code_dim=4, whiten=True, quantizer_dropout=0.0)
    principal = ResidualQuantizer(**options, principal_maps=True)
    learned = ResidualQuantizer(**options)
    for quantizer in (principal, learned):
        quantizer.draw_codebooks(z, generator=torch.Generator().manual_seed(0))
    first = principal.stages[0]
    fitted = first.in_proj.weight.t()  # [16, 4], orthonormal columns
    torch.testing.assert_close(fitted @ fitted.t(), basis @ basis.t(), atol=0.01, rtol=0)  # the same subspace
    on_subspace = torch.randn(10, 4) @ basis.t() + z[0].mean(0)
    with torch.no_grad():
        torch.testing.assert_close(first.out_proj(first.in_proj(on_subspace)), on_subspace, atol=0.02, rtol=0)
        left = {
            name: (z - q.eval()(z).quantized).pow(2).mean()
            for name, q in [("principal", principal), ("learned", learned)]
        }
    assert left["principal"] < 0.2 * left["learned"], left  # random maps search where little varies

    model = tiny_codec(principal_maps=True)
    maps = {id(p) for s in model.quantizer.stages for p in (*s.in_proj.parameters(), *s.out_proj.parameters())}
    assert maps and not maps & {id(p) for g in _param_groups(model, 10.0) for p in g["params"]}
    model.train()(torch.randn(2, 1, 4 * HOP)).audio.sum().backward()  # fits the maps on its first batch
    for stage in model.quantizer.stages:
        rows = stage.in_proj.weight
        torch.testing.assert_close(rows @ rows.t(), torch.eye(8), atol=1e-4, rtol=0)  # orthonormal, not random
        assert rows.grad is None
    with pytest.raises(ValueError, match="principal_maps needs a code_dim"):
        ResidualQuantizer(16, 2, 64, code_dim=[None, 4], principal_maps=True)


def test_frames_drawn_as_codes_are_not_drawn_again_by_the_next_stages():
    """A frame drawn as a code has a residual of exactly zero: drawn again, the frames a large first stage took
    became one repeated code in every later stage (half of a second 16,384-code stage, three quarters of
    the small stages' codes, in the fourth release's first draw)."""
    torch.manual_seed(0)
    z = torch.randn(1, 2048, 16)
    quantizer = ResidualQuantizer(dim=16, n_stages=3, codebook_size=[1024, 512, 256], code_dim=None)
    quantizer.draw_codebooks(z, generator=torch.Generator().manual_seed(0))
    for stage in quantizer.stages[1:]:
        codes = stage.codebook().detach()
        assert codes.unique(dim=0).shape[0] == stage.codebook_size  # no code repeated
        assert codes.norm(dim=1).min() > 0.1  # and none the zero residual of a frame drawn before
    with pytest.raises(ValueError, match="needs at least as many frames"):
        quantizer.draw_codebooks(z[:, :1500])  # 1024 + 512 leave fewer than the third stage's 256


@pytest.mark.parametrize("kind", ["simvq", "vq"])
def test_unused_codes_move_to_where_the_stage_quantizes_worst_and_the_used_ones_stay(kind):
    torch.manual_seed(0)
    centres = torch.randn(12, 16) * 3.0
    z = (centres[torch.randint(12, (4000,))] + 0.3 * torch.randn(4000, 16))[None]
    quantizer = ResidualQuantizer(
        dim=16, n_stages=2, codebook_size=[256, 64], code_dim=4, whiten=True, quantizer_dropout=0.0, kind=kind
    )
    quantizer.train()(z)  # whitening statistics and rescaled Gaussian codes: many fall where no input does
    quantizer.eval()
    first = quantizer.stages[0]
    with torch.no_grad():
        inputs, before = first.lookup_input(z[0]), first.codebook().clone()
        used = first.encode(z[0]).unique()
        error_before = torch.cdist(inputs, before).min(1).values.pow(2).mean()
    moved = quantizer.draw_codebooks(z, [0], torch.Generator().manual_seed(0), unused_only=True)
    with torch.no_grad():
        after = first.codebook()
        error_after = torch.cdist(inputs, after).min(1).values.pow(2).mean()
        now_used = first.encode(z[0]).unique()
    assert moved == [256 - used.numel(), 0] and moved[0] > 50
    assert torch.allclose(after[used], before[used], atol=1e-5)  # the codes in use did not move
    was_unused = torch.ones(256, dtype=torch.bool)
    was_unused[used] = False
    assert torch.isin(was_unused.nonzero().squeeze(1), now_used).all()  # each moved code sits on an input
    assert error_after < 0.5 * error_before
