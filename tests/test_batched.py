"""Batched streaming steps: every stream's output is bit for bit its output alone, whatever else is in the batch."""

from __future__ import annotations

import pytest
import torch

from codec.batched import StreamBatch
from codec.model import CALLER_STATE, CodecStream, half_state
from codec.modules import MIN_ROWS, TRANSPOSED_ROW_BY_ROW, VECTOR_BLOCK, Linear, channels_first, vectorised
from tests.conftest import speechlike, tiny_codec

HOP = 320
FRAMES = 9


@pytest.fixture(scope="module")
def model():
    # Every stateful path of the shipped model: propagated phase, pitch prior, re-phasing that hears what
    # was played, advance features.
    return tiny_codec(seed=3, phase="propagated", pitch_prior=True, rephase_iters=1, advance_features=True)


@pytest.fixture(scope="module")
def clips() -> list[torch.Tensor]:
    return [torch.from_numpy(speechlike(FRAMES * HOP / 16000, seed=s)) * (0.5 + s / 8) for s in range(7)]


def _run(model, clips, plan: list[tuple[int, int, int]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """plan: (clip, first step, stages) per stream. Each step encodes the next frame of every live stream in
    one batch and decodes those codes in another: {clip: (codes [S, F], decoded samples)}."""
    batch = StreamBatch(model, capacity=2)  # grows as streams open
    enc: dict[int, int] = {}
    dec: dict[int, int] = {}
    codes: dict[int, list] = {c: [] for c, _, _ in plan}
    audio: dict[int, list] = {c: [] for c, _, _ in plan}
    for step in range(max(start for _, start, _ in plan) + FRAMES + 1):
        for c, start, _ in plan:
            if step == start:
                enc[c], dec[c] = batch.open(), batch.open()
            if step == start + FRAMES:  # its slots go back, to be reused by later streams
                batch.close(enc[c])
                batch.close(dec[c])
        live = [(c, step - start, n) for c, start, n in plan if 0 <= step - start < FRAMES]
        if not live:
            continue
        frames = torch.stack([clips[c][k * HOP : (k + 1) * HOP] for c, k, _ in live])
        got = batch.encode([enc[c] for c, _, _ in live], frames)
        for (c, _, n), row in zip(live, got):
            codes[c].append(row[:n])
        width = max(n for _, _, n in live)
        frame_codes = torch.stack([torch.cat([row[:n], row.new_zeros(width - n)]) for (_, _, n), row in zip(live, got)])
        out = batch.decode([dec[c] for c, _, _ in live], frame_codes, [n for _, _, n in live])
        for (c, _, _), samples in zip(live, out):
            audio[c].append(samples)
    return {c: (torch.stack(codes[c], 1), torch.cat(audio[c])) for c in codes}


def test_each_stream_gets_in_a_batch_what_it_gets_alone(model, clips):
    # Streams join and leave at different steps (batches of 1 to 7 rows) and keep different stage counts.
    plan = [(c, (3 * c) % 5, 1 + c % 4) for c in range(len(clips))]
    together = _run(model, clips, plan)
    for c, _start, n in plan:
        alone = _run(model, clips, [(c, 0, n)])[c]
        assert torch.equal(together[c][0], alone[0]), f"clip {c}: codes differ"
        assert torch.equal(together[c][1], alone[1]), f"clip {c}: audio differs"
    sizes = {sum(1 for _, s, _ in plan if 0 <= step - s < FRAMES) for step in range(4 + FRAMES)}
    assert min(sizes) < MIN_ROWS < max(sizes)  # padded batches and full ones both ran


def test_a_batched_stream_gives_the_offline_codes_and_audio(model, clips):
    codes, audio = _run(model, clips, [(c, c, 4) for c in range(3)])[2]
    with torch.inference_mode():
        offline = model.encode(clips[2][None, None])[0]
        decoded = model.decode(offline[None])[0, 0]
    assert torch.equal(codes, offline)
    assert audio.shape[-1] == FRAMES * HOP - model.decoder_delay  # the first frame drops the delay
    assert torch.equal(audio, decoded[: audio.shape[-1]])


def test_a_batched_state_goes_on_through_model_stream(model, clips):
    batch = StreamBatch(model)
    slots = [batch.open(), batch.open()]
    codes = model.encode(clips[0][None, None])[0]  # [4, F]
    first = batch.decode(slots, torch.stack([codes[:, 0], codes[:, 0]]))
    assert [len(x) for x in first] == [HOP - model.decoder_delay] * 2
    stream = CodecStream(model, batch.state(slots[0]))
    with torch.inference_mode():
        rest = stream.decode(codes[None, :, 1:])[0, 0]
        tail = stream.flush_decoder()[0, 0]
        offline = model.decode(codes[None])[0, 0]
    assert torch.equal(torch.cat([first[0], rest, tail]), offline)


def test_steps_check_their_inputs(model):
    batch = StreamBatch(model)
    slot = batch.open()
    with pytest.raises(ValueError, match="one frame of 320 samples per slot"):
        batch.encode([slot], torch.zeros(2, HOP))
    with pytest.raises(ValueError, match="one frame per slot"):
        batch.decode([slot], torch.zeros(1, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one stream"):
        batch.encode([], torch.zeros(0, HOP))
    batch.close(slot)
    with pytest.raises(ValueError, match="is not open"):
        batch.encode([slot], torch.zeros(1, HOP))


@pytest.mark.parametrize("fn", [torch.sgn, torch.angle, torch.abs])
def test_vectorised_results_do_not_depend_on_the_position_in_the_tensor(fn):
    torch.manual_seed(0)
    z = torch.randn(3 * VECTOR_BLOCK + 5, dtype=torch.complex64)
    whole = vectorised(fn, z)
    # Each element alone gives what it gives inside the tensor, in its body or in its last elements.
    for i in list(range(8)) + list(range(len(z) - 8, len(z))):
        assert torch.equal(vectorised(fn, z[i : i + 1])[0], whole[i])
    assert torch.equal(whole[: 3 * VECTOR_BLOCK], fn(z)[: 3 * VECTOR_BLOCK])  # the body is the kernel's own


@pytest.mark.parametrize("frames", [1, TRANSPOSED_ROW_BY_ROW - 1, TRANSPOSED_ROW_BY_ROW + 3])
def test_channels_first_holds_the_transposes_values(frames):
    x = torch.randn(3, frames, 16)
    moved = channels_first(x)
    assert torch.equal(moved, x.transpose(1, 2))
    long = frames >= TRANSPOSED_ROW_BY_ROW
    assert moved.is_contiguous() if long else moved.data_ptr() == x.data_ptr()  # copied, or a view
    assert channels_first(x.requires_grad_()).grad_fn is not None


def test_packed_linear_rows_agree_whatever_their_number_and_training_uses_f_linear():
    torch.manual_seed(1)
    layer = Linear(48, 40)
    x = torch.randn(70, 48)
    with torch.inference_mode():
        whole = layer(x)
        assert all(torch.equal(layer(x[:n]), whole[:n]) for n in (2, 3, 4, 17, 69))
        assert torch.allclose(whole, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
        layer.weight.mul_(2)  # a changed weight is packed again
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
    trained = layer(x)  # gradients on: F.linear itself
    assert trained.requires_grad and torch.equal(trained, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_the_two_halves_share_out_the_state_a_caller_does_not_keep(model):
    """A batched step moves only its own half's state (`half_state`): together the halves are every tensor of
    the streaming state but the caller's, each in one half."""
    encode, decode = half_state(model, "encode"), half_state(model, "decode")
    assert encode[0] == "features.history" and all(n.startswith("encoder.") for n in encode[1:])
    assert "synthesis.tail" in decode and not set(encode) & set(decode)
    every = model.init_streaming_state(1).tensors()
    assert sorted(encode + decode) == sorted(n for n in every if n not in CALLER_STATE)
    with pytest.raises(ValueError, match="encode"):
        half_state(model, "both")
