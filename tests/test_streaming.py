"""Streaming state as values: many streams on one model, interleaved or in threads, each exactly as if alone;
snapshots; the state as named tensors; a whole decode streamed in chunks on two threads."""

from __future__ import annotations

import threading

import pytest
import torch

from codec.streaming import StreamingState
from tests.conftest import tiny_codec

HOP = 320


@pytest.fixture(scope="module")
def model():
    return tiny_codec(seed=4, phase="propagated")  # the phase sums are decoder state too


def _jobs(model) -> list[dict]:
    """Three encode and two decode streams: different inputs, batch sizes, chunk sizes and stage counts."""
    torch.manual_seed(5)
    return [
        dict(op="encode", data=torch.randn(1, 1, 13 * HOP + 17) * 0.3, size=111, n_stages=4),
        dict(op="encode", data=torch.randn(2, 1, 9 * HOP + 250) * 0.3, size=2 * HOP + 7, n_stages=2),
        dict(op="encode", data=torch.randn(1, 1, 11 * HOP) * 0.3, size=HOP, n_stages=3),
        dict(op="decode", data=torch.randint(0, 64, (1, 4, 17)), size=3, n_stages=None),
        dict(op="decode", data=torch.randint(0, 64, (2, 2, 12)), size=1, n_stages=None),
    ]


def _steps(stream, op, data, size, n_stages):
    """One stream's outputs, one chunk per step, then its flush."""
    for start in range(0, data.shape[-1], size):
        chunk = data[..., start : start + size]
        yield stream.encode(chunk, n_stages) if op == "encode" else stream.decode(chunk)
    yield stream.flush_encoder(n_stages) if op == "encode" else stream.flush_decoder()


def _alone(model, job) -> torch.Tensor:
    return torch.cat(list(_steps(model.stream(job["data"].shape[0]), **job)), dim=-1)


def test_interleaved_streams_on_one_model_give_what_each_gives_alone(model):
    jobs = _jobs(model)
    running = [_steps(model.stream(job["data"].shape[0]), **job) for job in jobs]
    outputs: list[list[torch.Tensor]] = [[] for _ in jobs]
    while any(running):
        for i, steps in enumerate(running):  # one chunk of each stream in turn
            if steps is not None:
                try:
                    outputs[i].append(next(steps))
                except StopIteration:
                    running[i] = None
    for job, out in zip(jobs, outputs):
        assert torch.equal(torch.cat(out, dim=-1), _alone(model, job))
    assert torch.equal(_alone(model, jobs[0]), model.encode(jobs[0]["data"]))  # and alone is offline


def test_streams_in_threads_on_one_model_give_what_each_gives_alone(model):
    jobs = _jobs(model) * 2  # ten threads, two on each input
    start = threading.Barrier(len(jobs))
    results: list[torch.Tensor | BaseException | None] = [None] * len(jobs)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = _alone(model, jobs[i])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job, got in zip(jobs, results):
        assert isinstance(got, torch.Tensor), got
        assert torch.equal(got, _alone(model, job))


def test_a_cloned_stream_continues_exactly_like_the_original(model):
    wav = torch.randn(1, 1, 8 * HOP) * 0.3
    codes = torch.randint(0, 64, (1, 4, 10))
    enc, dec = model.stream(), model.stream()
    enc.encode(wav[..., : 3 * HOP + 100])
    dec.decode(codes[..., :4])
    enc_copy, dec_copy = enc.clone(), dec.clone()
    rest = wav[..., 3 * HOP + 100 :]
    copied = torch.cat([enc_copy.encode(rest), enc_copy.flush_encoder()], dim=-1)
    audio_copied = torch.cat([dec_copy.decode(codes[..., 4:]), dec_copy.flush_decoder()], dim=-1)
    # the copies ran to the end; the originals were left where they were
    assert torch.equal(torch.cat([enc.encode(rest), enc.flush_encoder()], dim=-1), copied)
    assert torch.equal(torch.cat([dec.decode(codes[..., 4:]), dec.flush_decoder()], dim=-1), audio_copied)


def test_the_state_as_named_tensors_round_trips(model):
    wav = torch.randn(2, 1, 5 * HOP + 33) * 0.3
    stream = model.stream(2)
    stream.encode(wav[..., : 2 * HOP + 50])
    stream.decode(torch.randint(0, 64, (2, 4, 3)))
    tensors = stream.state.tensors()
    assert {
        "samples",
        "features.history",
        "encoder.0.dwconv.history",
        "synthesis.tail",
        "synthesis.skip",
        "synthesis.phase",
    } <= set(tensors)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert tensors["samples"].shape == (2, 1, 50) and tensors["synthesis.skip"].item() == 0
    assert model.stream(2).state.tensors()["synthesis.skip"].item() == model.decoder_delay

    fresh = model.stream(2)
    fresh.state.load_tensors({k: t.clone() for k, t in tensors.items()})
    rest = wav[..., 2 * HOP + 50 :]
    assert torch.equal(fresh.encode(rest), stream.encode(rest))
    with pytest.raises(ValueError, match="missing \\['samples'\\]"):
        fresh.state.load_tensors({k: t for k, t in tensors.items() if k != "samples"})


def test_a_state_runs_on_its_own_model_and_contexts_do_not_nest(model):
    other = tiny_codec(seed=4, phase="propagated")
    state = model.init_streaming_state(1)
    assert isinstance(state, StreamingState) and state.batch_size == 1
    with pytest.raises(ValueError, match="another model"):
        with other.streaming(state):
            pass
    with model.streaming(state):
        assert model.is_streaming and model.synthesis.is_streaming and not other.is_streaming
        with pytest.raises(RuntimeError, match="nested"):
            with model.streaming(1):
                pass
    assert not model.is_streaming


def test_decode_returns_an_ordinary_tensor():
    """Decoding runs in inference mode, but what it returns is an ordinary tensor: autograd may take it as a
    target."""
    model = tiny_codec(seed=6, phase="propagated", rephase_iters=1, carry_share=0.3, pitch_prior=True)
    decoded = model.decode(torch.randint(0, 64, (2, 3, 10), generator=torch.Generator().manual_seed(0)))
    assert not decoded.is_inference()
    estimate = torch.zeros_like(decoded, requires_grad=True)
    torch.nn.functional.mse_loss(estimate, decoded).backward()
    assert estimate.grad is not None
