"""The worker's stream scheduler: streams that join, leave, stall or read slowly cost the others nothing, and
each gets bit for bit what it gets alone; a stream that falls behind real time is told so."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from codec.batched import StreamBatch
from server.scheduler import END, Scheduler, measure_capacity, pump
from tests.conftest import speechlike, tiny_codec

HOP = 320


@pytest.fixture(scope="module")
def model():
    return tiny_codec(seed=5, phase="propagated", pitch_prior=True, rephase_iters=1, advance_features=True)


def _frames(seconds: float, seed: int) -> np.ndarray:
    x = speechlike(seconds, seed=seed)
    return x[: len(x) // HOP * HOP].reshape(-1, HOP)


async def _collect(stream, out: list) -> None:
    async def keep(data: bytes) -> None:
        out.append(data)

    await pump(stream, keep)


def _run(model, script, max_lag_s: float = 60.0) -> list[tuple[list[bytes], str | None]]:
    """Run `script(scheduler, open_stream)` on a fresh scheduler. `open_stream(direction, stages)` starts a
    handler that opens a stream and sends its output to a list (the handler's task and, once open, the stream
    land in the dict it returns; cancelling the task is the client leaving). Returns each stream's output
    and failure reason, in the order opened."""
    results = []

    async def main():
        scheduler = Scheduler(max_lag_s)
        tasks = []

        def open_stream(direction: str, stages: int = 4) -> dict:
            out: list[bytes] = []
            holder: dict = {}

            async def handler():
                stream = scheduler.open(model, direction, stages)
                holder["stream"] = stream
                try:
                    await _collect(stream, out)
                except asyncio.CancelledError:  # failed by the scheduler, or the client left
                    pass
                finally:
                    scheduler.close(stream)
                return out, stream.error.reason if stream.error else None

            holder["task"] = asyncio.create_task(handler())
            tasks.append(holder["task"])
            return holder

        try:
            await script(scheduler, open_stream)
            results.extend(await asyncio.gather(*tasks))
        finally:
            scheduler.stop()

    asyncio.run(main())
    return results


async def _until_open(*holders: dict) -> list:
    while not all("stream" in h for h in holders):
        await asyncio.sleep(0)
    return [h["stream"] for h in holders]


def _encode_alone(model, frames: np.ndarray, stages: int = 4) -> bytes:
    async def script(scheduler, open_stream):
        (stream,) = await _until_open(open_stream("encode", stages))
        scheduler.submit(stream, frames, end=True)

    return b"".join(_run(model, script)[0][0])


def test_streams_that_join_leave_and_stall_each_get_what_they_get_alone(model, monkeypatch):
    a, b, c = _frames(0.5, 1), _frames(0.4, 2), _frames(1.0, 3)
    sizes = []
    step = StreamBatch.encode

    def counted(self, slots, *args):
        sizes.append(len(slots))
        return step(self, slots, *args)

    monkeypatch.setattr(StreamBatch, "encode", counted)

    async def script(scheduler, open_stream):
        opened = open_stream("encode")
        leaving = open_stream("encode")
        first, leaver = await _until_open(opened, leaving)
        scheduler.submit(first, a[:10])
        scheduler.submit(leaver, b)
        await asyncio.sleep(0.01)
        leaving["task"].cancel()  # its client leaves mid-stream, with frames still queued
        (joiner,) = await _until_open(open_stream("encode", 2))  # joins mid-stream, with fewer stages
        scheduler.submit(joiner, c)
        await asyncio.sleep(0.01)  # `first` stalls meanwhile: the others go on
        scheduler.submit(first, a[10:], end=True)
        scheduler.submit(joiner, c[:0], end=True)

    first, leaver, joiner = _run(model, script)
    assert max(sizes) >= 2  # streams did share steps
    assert b"".join(first[0]) == _encode_alone(model, a) and first[1] is None
    assert b"".join(joiner[0]) == _encode_alone(model, c, stages=2)
    assert len(b"".join(leaver[0])) < len(b) * 4 * 2 and leaver[1] is None  # cut off when it left


def test_a_client_that_does_not_read_holds_no_one_else_and_is_told_it_fell_behind(model):
    a = _frames(1.0, 4)
    results = []

    async def main():
        scheduler = Scheduler(max_lag_s=0.2)
        never = asyncio.Event()

        async def stuck_send(data: bytes) -> None:  # a client whose socket never drains
            await never.wait()

        async def handler(send):
            stream = scheduler.open(model, "encode", 4)
            scheduler.submit(stream, a, end=True)
            try:
                await pump(stream, send)
            except asyncio.CancelledError:
                pass
            scheduler.close(stream)
            return stream.error

        got: list[bytes] = []

        async def keep(data: bytes) -> None:
            got.append(data)

        try:
            results.extend(await asyncio.gather(handler(stuck_send), handler(keep)))
        finally:
            scheduler.stop()
        results.append(b"".join(got))

    asyncio.run(main())
    stuck, reader, data = results
    assert stuck is not None and stuck.reason == "behind-real-time" and stuck.code == 1013
    assert reader is None and data == _encode_alone(model, a)  # the reading client got everything


def test_a_stream_served_later_than_its_frames_are_due_is_told_so(model):
    async def script(scheduler, open_stream):
        (stream,) = await _until_open(open_stream("decode"))
        scheduler.submit(stream, np.zeros((3, 4), np.int64))

    ((out, reason),) = _run(model, script, max_lag_s=1e-6)  # every output is late by more than that
    assert reason == "behind-real-time" and out == []


def test_decode_streams_end_with_the_decoders_last_samples(model):
    codes = np.random.default_rng(0).integers(0, 64, (6, 4))

    async def script(scheduler, open_stream):
        (stream,) = await _until_open(open_stream("decode"))
        scheduler.submit(stream, codes, end=True)

    ((out, reason),) = _run(model, script)
    audio = np.frombuffer(b"".join(out), "<i2")
    assert reason is None and len(audio) == 6 * HOP  # the first frame's delay comes back at the end
    with torch.inference_mode():
        offline = model.decode(torch.from_numpy(codes.T)[None])[0, 0].numpy()
    assert np.abs(audio.astype(int) - np.round(np.clip(offline, -1, 1) * 32767)).max() <= 1


def test_capacity_is_measured_from_the_batched_step(model):
    streams, step_ms = measure_capacity(model, budget=0.5, probe=(4, 8), repeats=2)
    assert streams >= 2 and streams % 2 == 0
    assert step_ms <= 0.5 * 20 + 1e-9 or streams == 2  # the two steps of a full worker fit the budget


def test_end_follows_the_last_output(model):
    async def script(scheduler, open_stream):
        (stream,) = await _until_open(open_stream("encode"))
        scheduler.submit(stream, _frames(0.1, 5), end=True)
        assert stream.queue[-1] is END

    ((out, reason),) = _run(model, script)
    assert reason is None and len(b"".join(out)) == 5 * 4 * 2
